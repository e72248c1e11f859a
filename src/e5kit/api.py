"""The Python API: ``E5(model).encode_queries(...)`` / ``encode_passages(...)`` / ``encode(...)``."""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Sequence

import numpy as np
import torch

from . import pipeline
from .chunking import ChunkedEmbeddings, LongMode, encode_long
from .engine import Engine
from .loading import load_checkpoint
from .models import DEFAULT_MODEL
from .pipeline import PRECISIONS, Precision, Prepared, as_text_list, finish, quantize_embeddings
from .prompts import InputType, format_texts


# sentence-transformers prompt names -> E5 input types
PROMPT_NAMES = {"query": "query", "document": "passage", "passage": "passage"}


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
    is much faster than float32 at per-text cosine >= 0.9999 (docs/speed.md). ``backend``: "auto" (the exact path for
    the device: fp32 on CPU, bf16/fp16 on CUDA), "torch" (the same, explicitly) or "int8" (CPU only:
    int8 linear layers, per-text cosine to fp32 >= 0.99; see docs/speed.md). ``threads``: CPU
    threads, set process-wide for torch (default: torch's setting is left as it is).
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
        self._local = threading.local()

    @classmethod
    def from_engine(cls, engine: Engine) -> "E5":
        """An E5 over an existing engine (e.g. one wrapping weights in training), without reloading."""
        self = cls.__new__(cls)
        self.engine, self.spec, self._local = engine, engine.spec, threading.local()
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
        return (f"E5({self.name!r}, dim={self.dim}, device={self.device}, dtype={self.dtype}, "
                f"backend={self.backend!r}, prompt_style={self.prompt_style!r})")

    # ---- the pipeline: prepare -> embed -> finish (see e5kit.pipeline) --------------------

    def format(self, texts: Sequence[str], input_type: InputType, task: str | None = None) -> list[str]:
        """The exact strings the model sees for ``texts`` of the given kind."""
        return format_texts(as_text_list(texts), input_type, self.prompt_style, task)

    def prepare(self, texts: str | Sequence[str], input_type: InputType | None = None, *, task: str | None = None,
                prompt_style: str | None = None, truncate: bool = True, max_tokens: int | None = None,
                spans: bool = False) -> Prepared:
        """Prompt convention + tokenization + truncation policy (:func:`e5kit.pipeline.prepare`)."""
        return pipeline.prepare(self.engine, texts, input_type, prompt_style=prompt_style, task=task,
                                truncate=truncate, max_tokens=max_tokens, spans=spans)

    def prepare_ids(self, seqs: Sequence[Sequence[int]], *, truncate: bool = True,
                    max_tokens: int | None = None) -> Prepared:
        """Caller-supplied token ids, validated and cut if allowed (:func:`e5kit.pipeline.prepare_ids`)."""
        return pipeline.prepare_ids(self.engine, seqs, truncate=truncate, max_tokens=max_tokens)

    def embed(self, prepared: Prepared, *, batch_size: int = 32, max_batch_tokens: int = 16384,
              progress: bool | None = None, on_batch: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """Pooled, unnormalised float32 vectors of prepared inputs (:func:`e5kit.pipeline.embed`)."""
        return pipeline.embed(self.engine, prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                              progress=progress, on_batch=on_batch)

    @property
    def last_truncated(self) -> list[int]:
        """Indices of the inputs the calling thread's last ``encode*`` call truncated."""
        return getattr(self._local, "truncated", [])

    @last_truncated.setter
    def last_truncated(self, value: list[int]) -> None:
        self._local.truncated = value

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 32,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        normalize_embeddings: bool = True,
        show_progress_bar: bool | None = None,
        precision: Precision = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        truncate_dim: int | None = None,
        truncate: bool = True,
        max_batch_tokens: int = 16384,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embed texts exactly as given (the caller has applied any prefix), or, as in
        sentence-transformers, with ``prompt_name`` ("query", "document"/"passage": the model's own
        convention, never added twice) or a literal ``prompt`` put in front of every text.

        Returns an (n, dim) float32 array (one row per text, in input order; a single string gives
        shape (dim,)); ``convert_to_tensor`` a tensor, ``convert_to_numpy=False`` a list of tensors.
        ``truncate_dim`` keeps the first N dimensions (re-normalised). Over-long inputs are truncated
        to the model's limit with a :class:`TruncationWarning` (their indices in
        ``self.last_truncated``, per thread), or raise :class:`~e5kit.engine.InputTooLongError` with
        ``truncate=False``.
        """
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt_name is not None and prompt_name not in PROMPT_NAMES:
            raise ValueError(f"prompt_name must be one of {sorted(PROMPT_NAMES)}, not {prompt_name!r}")
        if prompt is not None:
            texts = prompt + texts if isinstance(texts, str) else [prompt + t for t in as_text_list(texts)]
        return self._encode(texts, PROMPT_NAMES.get(prompt_name), None, batch_size=batch_size,
                            normalize_embeddings=normalize_embeddings, show_progress_bar=show_progress_bar,
                            precision=precision, convert_to_numpy=convert_to_numpy, convert_to_tensor=convert_to_tensor,
                            truncate_dim=truncate_dim, truncate=truncate, max_batch_tokens=max_batch_tokens)

    def encode_queries(self, texts: str | Sequence[str], task: str | None = None, **kwargs) -> np.ndarray | torch.Tensor:
        """Embed queries with the model's query convention (``query: `` or the instruct template)."""
        if task is not None and self.prompt_style != "instruct":
            warnings.warn(f"task= is ignored: {self.name} is not an instruct model (its queries get "
                          f"{self.format(['x'], 'query')[0][:-1]!r})", UserWarning, stacklevel=2)
        return self._encode(texts, "query", task, **kwargs)

    def encode_passages(self, texts: str | Sequence[str], long: LongMode = "truncate", *, chunk_overlap: int = 64,
                        **kwargs) -> np.ndarray | torch.Tensor | ChunkedEmbeddings:
        """Embed documents with the model's passage convention (``passage: `` or nothing).

        ``long``: what to do with passages over the token limit. "truncate": cut them (with a
        :class:`TruncationWarning`). "chunks": split every passage with :func:`e5kit.chunk`
        (``chunk_overlap`` tokens shared by neighbours) and return :class:`ChunkedEmbeddings`,
        each chunk's vector with its text's index and character span. "mean": one vector per
        passage, the normalised mean of its chunk vectors.
        """
        if long != "truncate":
            return encode_long(self, texts, long, overlap=chunk_overlap, **kwargs)
        return self._encode(texts, "passage", None, **kwargs)

    def encode_query(self, texts: str | Sequence[str], task: str | None = None, **kwargs):
        """sentence-transformers' name for :meth:`encode_queries` (a ``prompt``/``prompt_name``
        given here replaces the query convention, as in ST)."""
        if "prompt" in kwargs or "prompt_name" in kwargs:
            return self.encode(texts, **kwargs)
        return self.encode_queries(texts, task=task, **kwargs)

    def encode_document(self, texts: str | Sequence[str], **kwargs):
        """sentence-transformers' name for :meth:`encode_passages` (``prompt``/``prompt_name`` as in ST)."""
        if "prompt" in kwargs or "prompt_name" in kwargs:
            return self.encode(texts, **kwargs)
        return self.encode_passages(texts, **kwargs)

    def get_sentence_embedding_dimension(self) -> int:
        """The embedding size (sentence-transformers' name for :attr:`dim`)."""
        return self.dim

    @property
    def max_seq_length(self) -> int:
        """Token limit per input, special tokens included (sentence-transformers' name)."""
        return self.max_tokens

    @property
    def tokenizer(self):
        """The model's ``tokenizers.Tokenizer`` (a fast tokenizer; not a transformers wrapper)."""
        return self.engine.tokenizer

    def _encode(self, texts, input_type, task, *, batch_size: int = 32, normalize_embeddings: bool = True,
                show_progress_bar: bool | None = None, precision: Precision = "float32", convert_to_numpy: bool = True,
                convert_to_tensor: bool = False, truncate_dim: int | None = None, truncate: bool = True,
                max_batch_tokens: int = 16384):
        single = isinstance(texts, str)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        prepared = self.prepare(texts, input_type, task=task, truncate=truncate)
        self.last_truncated = prepared.truncated
        if prepared.truncated:
            cut = prepared.truncated
            warnings.warn(
                f"{len(cut)} of {len(prepared)} inputs exceeded {self.max_tokens} tokens and were "
                f"truncated (indices {cut[:10]}{'...' if len(cut) > 10 else ''})",
                TruncationWarning,
                stacklevel=3,
            )
        pooled = self.embed(prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                            progress=show_progress_bar)
        out = finish(pooled, normalize=normalize_embeddings, dimensions=truncate_dim, precision=precision)
        if precision == "float32" and (convert_to_tensor or not convert_to_numpy):
            out = torch.from_numpy(out)
            if not convert_to_tensor:
                out = list(out)
        return out[0] if single else out

    def tokenize(self, texts: Sequence[str], truncate: bool = True) -> list[list[int]]:
        """Token ids the model would see (special tokens included, truncated to the limit)."""
        return self.prepare(texts, None, truncate=truncate).ids

    @staticmethod
    def similarity(a, b) -> np.ndarray:
        """Cosine similarity x 100 between every row of ``a`` and every row of ``b`` (model-card scores)."""
        a = _as_2d(a)
        b = _as_2d(b)
        a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return (a @ b.T) * 100.0


def _as_2d(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    return x[None, :] if x.ndim == 1 else x


__all__ = ["E5", "TruncationWarning", "Prepared", "quantize_embeddings"]
