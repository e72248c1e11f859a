"""The Python API: ``E5(model).encode_queries(...)`` / ``encode_passages(...)`` / ``encode(...)``."""

from __future__ import annotations

import os
import warnings
from typing import Literal, Sequence

import numpy as np
import torch

from .engine import Engine
from .loading import load_checkpoint
from .models import DEFAULT_MODEL
from .prompts import InputType, format_texts

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


class TruncationWarning(UserWarning):
    """Some inputs were longer than the model's token limit and were cut."""


class E5:
    """An E5 embedding model.

    >>> model = E5("intfloat/e5-small-v2")            # hub id or local directory
    >>> q = model.encode_queries(["how much protein should a female eat"])
    >>> p = model.encode_passages(["As a general guideline, the CDC's average requirement ..."])
    >>> model.similarity(q, p)                         # cosine x 100, as on the model card

    ``device``: "cpu", "cuda", "cuda:1" or None (CUDA when available). ``dtype``: "float32",
    "float16", "bfloat16" or None (float32 on CPU, bf16/fp16 on CUDA); on CPUs with AMX, "bfloat16"
    is ~3x faster than float32 at per-text cosine >= 0.9999. ``backend``: "auto" (the exact path for
    the device: fp32 on CPU, bf16/fp16 on CUDA), "torch" (the same, explicitly) or "int8" (CPU only:
    int8 linear layers, per-text cosine to fp32 >= 0.99; see docs/speed.md). ``threads``: CPU
    threads (default: every core, or OMP_NUM_THREADS).
    ``prompt_style`` overrides the registry / metadata ("e5", "instruct" or "none").
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        backend: str = "auto",
        prompt_style: str | None = None,
        revision: str | None = None,
        cache_dir: str | None = None,
        threads: int | None = None,
    ):
        checkpoint = load_checkpoint(model, revision=revision, prompt_style=prompt_style, cache_dir=cache_dir)
        self.engine = Engine(checkpoint, device=device, dtype=dtype, threads=threads, backend=backend)
        self.spec = checkpoint.spec
        self.last_truncated: list[int] = []

    @classmethod
    def from_engine(cls, engine: Engine) -> "E5":
        """An E5 over an existing engine (e.g. one wrapping weights in training), without reloading."""
        self = cls.__new__(cls)
        self.engine, self.spec, self.last_truncated = engine, engine.spec, []
        return self

    # ---- properties -----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.engine.dim

    @property
    def prompt_style(self) -> str:
        return self.spec.prompt_style

    @property
    def backend(self) -> str:
        """The backend in use: "torch" or "int8" ("auto" resolved)."""
        return self.engine.backend

    @property
    def max_tokens(self) -> int:
        return self.engine.max_tokens

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    def __repr__(self) -> str:
        return f"E5({self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype}, backend={self.backend!r}, prompt_style={self.prompt_style!r})"

    # ---- encoding -------------------------------------------------------------------------

    def format(self, texts: Sequence[str], input_type: InputType, task: str | None = None) -> list[str]:
        """The exact strings the model sees for ``texts`` of the given kind."""
        return format_texts(_as_list(texts), input_type, self.prompt_style, task)

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        *,
        normalize_embeddings: bool = True,
        show_progress_bar: bool | None = None,
        precision: Precision = "float32",
        convert_to_tensor: bool = False,
        truncate: bool = True,
        max_batch_tokens: int = 16384,
    ) -> np.ndarray | torch.Tensor:
        """Embed texts exactly as given (the caller has applied any prefix).

        Returns an (n, dim) float32 array (one row per text, in input order; a single string gives
        shape (dim,)). Over-long inputs are truncated to the model's limit with a
        :class:`TruncationWarning` (their indices in ``self.last_truncated``), or raise
        :class:`~e5kit.engine.InputTooLongError` with ``truncate=False``.
        """
        single = isinstance(texts, str)
        batch = _as_list(texts)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        tok = self.engine.tokenize(batch, truncate=truncate)
        self.last_truncated = tok.truncated
        if tok.truncated:
            warnings.warn(
                f"{len(tok.truncated)} of {len(batch)} inputs exceeded {self.max_tokens} tokens and were "
                f"truncated (indices {tok.truncated[:10]}{'...' if len(tok.truncated) > 10 else ''})",
                TruncationWarning,
                stacklevel=2,
            )
        emb = self.engine.embed_ids(
            tok.ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
            normalize=normalize_embeddings, progress=show_progress_bar,
        )
        if precision != "float32":
            out = quantize_embeddings(emb.numpy(), precision)
            return out[0] if single else out
        if convert_to_tensor:
            return emb[0] if single else emb
        arr = emb.numpy()
        return arr[0] if single else arr

    def encode_queries(self, texts: str | Sequence[str], task: str | None = None, **kwargs) -> np.ndarray | torch.Tensor:
        """Embed queries with the model's query convention (``query: `` or the instruct template)."""
        return self.encode(self._formatted(texts, "query", task), **kwargs)

    def encode_passages(self, texts: str | Sequence[str], **kwargs) -> np.ndarray | torch.Tensor:
        """Embed documents with the model's passage convention (``passage: `` or nothing)."""
        return self.encode(self._formatted(texts, "passage", None), **kwargs)

    def _formatted(self, texts, input_type, task):
        out = self.format(texts, input_type, task)
        return out[0] if isinstance(texts, str) else out

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids the model would see (special tokens included, truncated to the limit)."""
        return self.engine.tokenize(_as_list(texts), truncate=truncate).ids

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity x 100 between every row of ``a`` and every row of ``b`` (model-card scores)."""
        a = _as_2d(a)
        b = _as_2d(b)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (a @ b.T) * 100.0


def quantize_embeddings(emb: np.ndarray, precision: Precision, ranges: np.ndarray | None = None) -> np.ndarray:
    """Lower-precision copies of float embeddings, as sentence-transformers defines them.

    int8 / uint8: each dimension mapped linearly onto 256 buckets between its min and max (taken
    from ``ranges``, shape (2, dim), or from ``emb`` itself). binary / ubinary: the sign bits packed
    8 per byte (binary is offset by -128 into int8).
    """
    emb = np.asarray(emb, dtype=np.float32)
    if precision == "float32":
        return emb
    if precision in ("binary", "ubinary"):
        packed = np.packbits(emb > 0, axis=-1)
        return (packed.astype(np.int16) - 128).astype(np.int8) if precision == "binary" else packed
    if precision not in ("int8", "uint8"):
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if ranges is None:
        ranges = np.stack([emb.min(axis=0), emb.max(axis=0)])
    starts = ranges[0]
    steps = np.maximum((ranges[1] - ranges[0]) / 255, 1e-12)
    if precision == "uint8":
        return np.clip((emb - starts) / steps, 0, 255).astype(np.uint8)
    return np.clip((emb - starts) / steps - 128, -128, 127).astype(np.int8)


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"input {i} is a {type(t).__name__}, expected str")
    return out


def _as_2d(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x[None, :] if x.ndim == 1 else x
