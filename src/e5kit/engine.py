"""Tokens in, pooled vectors out: tokenization, token-budget batching, device/dtype, pooling.

This is the backend every front end shares (the Python API, the CLI, the server's batching queue,
evaluation and training). It knows nothing of prompts: callers hand it final text.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Sequence

import torch
from tokenizers import Tokenizer

from .encoder import Encoder, embed_batch, pack_linears
from .loading import Checkpoint, load_encoder, load_tokenizer
from .quant import MIN_COSINE, PROBE_TEXTS, Int8QualityError, build_int8, int8_plan

log = logging.getLogger("e5kit")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


PROGRESS_AFTER_S = 5.0  # an automatic progress bar appears for jobs expected to take longer


class InputTooLongError(ValueError):
    """An input exceeds the model's token limit and the caller asked not to truncate."""

    def __init__(self, index: int, n_tokens: int, limit: int):
        self.index, self.n_tokens, self.limit = index, n_tokens, limit
        super().__init__(f"input {index} has {n_tokens} tokens, more than the model's limit of {limit}; "
                         f"shorten it or allow truncation")


@dataclass(frozen=True)
class Spans:
    """One input's tokens as the tokenizer split it, in ``ids`` order: the pieces, their character
    spans (start, stop) in the text, and which are special tokens."""

    pieces: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]


@dataclass
class Tokenized:
    ids: list[list[int]]
    truncated: list[int] = field(default_factory=list)  # indices of inputs that were cut
    spans: list[Spans] | None = None  # per input, when asked for

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.ids)


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', not {dtype!r}")
    return DTYPES[dtype]


BACKENDS = ("auto", "torch", "int8")

# On CPU a batch's activations should stay cache-sized: with bigger batches every linear layer
# streams its (tokens x intermediate) output through memory and freshly mapped pages, which costs
# more than the larger GEMMs save (measured in BENCHMARKS.md). Bytes of one FFN activation.
CPU_ACTIVATION_BYTES = 12 * 2**20


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` -> ``torch`` (the exact path: fp32 on CPU, bf16/fp16 on CUDA); ``int8`` only on CPU in fp32."""
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "int8":
        if device.type != "cpu":
            raise ValueError(f"the int8 backend runs on CPU only; on {device} use backend='torch' (bf16/fp16)")
        if dtype != torch.float32:
            raise ValueError(f"the int8 backend computes in int8 and picks its own float type for the other layers "
                             f"(bf16 on CPUs with AMX, else fp32); drop dtype={dtype} or use backend='torch'")
        return "int8"
    return "torch"


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group input indices into batches, longest first.

    Inputs are sorted by token count so each batch holds similar lengths (little attention
    padding); a batch closes when it has ``batch_size`` inputs or its padded size
    (count x longest) would pass ``max_batch_tokens``.
    """
    if batch_size < 1 or max_batch_tokens < 1:
        raise ValueError("batch_size and max_batch_tokens must be positive")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * longest > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class Engine:
    """A loaded checkpoint ready to turn token ids into embeddings."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        threads: int | None = None,
        encoder: Encoder | None = None,
        backend: str | None = "auto",
    ):
        self.checkpoint = checkpoint
        self.spec = checkpoint.spec
        self.config = checkpoint.config
        self.max_tokens = self.spec.max_tokens
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu" and self.dtype == torch.float16:
            raise ValueError("float16 is not supported on CPU; use float32 or bfloat16")
        self.backend = resolve_backend(backend, self.device, self.dtype)
        if threads is not None:  # torch's thread count is process-wide: changed only when asked
            if isinstance(threads, bool) or int(threads) < 1:
                raise ValueError(f"threads must be a positive integer, not {threads!r}")
            torch.set_num_threads(int(threads))
        self.tokenizer: Tokenizer = load_tokenizer(checkpoint.path, self.max_tokens)
        self._tokenizers: dict[int | None, Tokenizer] = {self.max_tokens: self.tokenizer}
        model = encoder if encoder is not None else load_encoder(checkpoint.path, checkpoint.config)
        self.model: torch.nn.Module = model.to(self.device, self.dtype).eval()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.int8_min_cosine: float | None = None
        if self.backend == "int8":
            self._quantize()
        if self.device.type == "cpu" and self.model is not encoder:
            pack_linears(self.model)  # only a model the engine owns: a caller's encoder may still train

    def _quantize(self) -> None:
        """Swap in the int8 model (built by this CPU's :func:`~e5kit.quant.int8_plan`), after checking
        it against fp32 on the probe texts."""
        plan, ids = int8_plan(), self.tokenize(PROBE_TEXTS).ids

        @torch.inference_mode()
        def embed(model: torch.nn.Module) -> torch.Tensor:
            return embed_batch(model, ids, self.device, normalize=False,
                               position_offset=self.config.position_offset, bucket=True)

        int8, self.int8_min_cosine = build_int8(self.model, embed, plan)
        if self.int8_min_cosine < MIN_COSINE:
            raise Int8QualityError(
                f"int8 quantization of {self.spec.name} is not accurate enough: per-text cosine to fp32 is "
                f"{self.int8_min_cosine:.4f} (< {MIN_COSINE}) on the probe texts; use backend='torch'")
        self.model, self.dtype = int8, plan.dtype

    @property
    def cpu_batch_tokens(self) -> int:
        """The token budget per batch on CPU (tokens x intermediate size kept cache-sized: twice the
        tokens in bf16 as in fp32)."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return min(8192, max(512, CPU_ACTIVATION_BYTES // (itemsize * self.config.intermediate_size)))

    def batch_budget(self, max_batch_tokens: int) -> int:
        """The padded-token budget one forward pass should use: the caller's, capped on CPU."""
        return min(max_batch_tokens, self.cpu_batch_tokens) if self.device.type == "cpu" else max_batch_tokens

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    # ---- tokenization ---------------------------------------------------------------------

    @cached_property
    def edge_ids(self) -> list[int]:
        """The special-token ids the tokenizer puts around any text ([CLS], [SEP] or <s>, </s>; none for
        a bare vocabulary): what the model's own id lists start and end with."""
        return self.tokenize([""]).ids[0]

    def _tokenizer(self, max_tokens: int | None) -> Tokenizer:
        """The tokenizer cutting at ``max_tokens`` (None: not at all), built once per limit."""
        tok = self._tokenizers.get(max_tokens)
        if tok is None:
            tok = Tokenizer.from_str(self.tokenizer.to_str())
            tok.encode_special_tokens = self.tokenizer.encode_special_tokens  # not part of to_str()
            tok.no_padding()
            if max_tokens is None:
                tok.no_truncation()
            else:
                tok.enable_truncation(max_tokens)
            self._tokenizers[max_tokens] = tok
        return tok

    def _limit(self, max_tokens: int | None) -> int:
        if max_tokens is None:
            return self.max_tokens
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            raise ValueError(f"max_tokens must be an integer >= 2, not {max_tokens!r}")
        return min(max_tokens, self.max_tokens)

    def tokenize(self, texts: Sequence[str], truncate: bool = True, max_tokens: int | None = None,
                 spans: bool = False) -> Tokenized:
        """Token ids (with special tokens) for each text, cut at the model's limit (or the lower
        ``max_tokens``); with ``spans``, each token's piece, character offsets and special flag too.

        With ``truncate=False`` an over-long input raises :class:`InputTooLongError`.
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"input {i} is a {type(t).__name__}, expected str")
        limit = self._limit(max_tokens)
        encs = self._tokenizer(limit).encode_batch(list(texts), add_special_tokens=True)
        ids = [e.ids for e in encs]
        truncated = [i for i, e in enumerate(encs) if e.overflowing]
        if truncated and not truncate:
            i = truncated[0]
            raise InputTooLongError(i, self.count_tokens([texts[i]])[0], limit)
        if not spans:
            return Tokenized(ids=ids, truncated=truncated)
        return Tokenized(ids=ids, truncated=truncated, spans=[
            Spans(e.tokens, e.offsets, [bool(m) for m in e.special_tokens_mask]) for e in encs])

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Untruncated token counts (special tokens included)."""
        return [len(e.ids) for e in self._tokenizer(None).encode_batch(list(texts))]

    def untruncated_tokenizer(self) -> Tokenizer:
        """The model's tokenizer without truncation or padding (offsets over long texts)."""
        return self._tokenizer(None)

    def check_ids(self, seqs: Sequence[Sequence[int]], truncate: bool = True,
                  max_tokens: int | None = None) -> Tokenized:
        """Validate caller-supplied token ids (vocabulary range, length) and cut them if allowed.

        A sequence that ends with the model's closing special token keeps it when cut, as the
        tokenizer cuts text (the ids of a long text cut here equal the text's own cut ids).
        """
        out, cut = [], []
        vocab = self.config.vocab_size
        limit = self._limit(max_tokens)
        close = self.edge_ids[-1:]  # [SEP] or </s>
        for i, s in enumerate(seqs):
            s = list(s)
            if not s:
                raise ValueError(f"input {i} has no tokens")
            bad = next((t for t in s if not isinstance(t, int) or t < 0 or t >= vocab), None)
            if bad is not None:
                raise ValueError(f"input {i} has token id {bad!r} outside the vocabulary (0..{vocab - 1})")
            if len(s) > limit:
                if not truncate:
                    raise InputTooLongError(i, len(s), limit)
                s = s[:limit - 1] + s[-1:] if close and s[-1] == close[0] else s[:limit]
                cut.append(i)
            out.append(s)
        return Tokenized(ids=out, truncated=cut)

    # ---- the model ------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """One batch: mean-pooled float32 vectors, on the device, unnormalised (normalisation is
        :func:`e5kit.pipeline.finish`'s)."""
        # On CPU, bucketed row counts let oneDNN reuse its per-shape GEMM kernels across batches.
        return embed_batch(self.model, seqs, self.device, False, self.config.position_offset,
                           bucket=self.device.type == "cpu")

    def embed_ids(
        self,
        seqs: Sequence[Sequence[int]],
        batch_size: int = 32,
        max_batch_tokens: int = 16384,
        progress: bool | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Pool many sequences in token-budget batches; rows come back in input order (CPU float32,
        unnormalised). ``on_batch(n_inputs, n_tokens)`` is called after every forward pass."""
        n = len(seqs)
        out = torch.empty(n, self.dim, dtype=torch.float32)
        if n == 0:
            return out
        batches = plan_batches([len(s) for s in seqs], batch_size, self.batch_budget(max_batch_tokens))
        bar = _Progress(sum(len(s) for s in seqs), progress)
        for b in batches:
            vecs = self.forward([seqs[i] for i in b])
            out[torch.tensor(b)] = vecs.cpu()
            ntok = sum(len(seqs[i]) for i in b)
            bar.update(ntok)
            if on_batch is not None:
                on_batch(len(b), ntok)
        bar.close()
        return out


class _Progress:
    """A token progress bar on stderr. ``show=None``: on a terminal, once the job is expected (from
    the speed so far) to take more than ``PROGRESS_AFTER_S`` seconds in all, however few its inputs."""

    def __init__(self, total: int, show: bool | None):
        self.total, self.show, self.done, self.bar = total, show, 0, None
        self.t0 = time.perf_counter()
        self.auto = show is None and sys.stderr.isatty()
        if show:
            self._open()

    def _open(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, initial=self.done, unit="tok", unit_scale=True, desc="embedding")

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is None and self.auto and self.done < self.total:
            elapsed = time.perf_counter() - self.t0
            if elapsed * self.total / self.done > PROGRESS_AFTER_S:
                self._open()
        elif self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def default_threads() -> int:
    """Threads torch should use: OMP_NUM_THREADS if set, else every core this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit():
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


__all__ = ["Engine", "Tokenized", "InputTooLongError", "Int8QualityError", "plan_batches", "resolve_device",
           "resolve_dtype", "resolve_backend", "default_threads", "BACKENDS"]
