"""The one path from text to vector: **prepare -> embed -> finish**.

Every entry point (``E5.encode*``, the server, ``index build``, mining, evaluation, the trainer's
evaluation) goes through these three steps and nothing below them:

- :func:`prepare`: the prompt convention (the model's, or an override), the instruction for a task,
  tokenization and the truncation policy. Returns :class:`Prepared` (token ids, the indices of the
  inputs that were cut, the exact strings the model saw).
- :func:`embed`: token ids -> mean-pooled, *unnormalised* float32 vectors, through the engine's
  token-budget batches (optional per-batch callback for progress and checkpoints).
- :func:`finish`: L2 normalisation, Matryoshka-style ``dimensions``, output precision. Normalisation
  happens here and only here.

The server puts its cross-request batching queue between the first and the last step; it calls
:meth:`~e5kit.engine.Engine.forward` per batch, which is what :func:`embed` calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .prompts import InputType, format_texts

if TYPE_CHECKING:
    from .engine import Engine, Spans

Precision = Literal["float32", "int8", "uint8", "binary", "ubinary"]
PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


@dataclass(frozen=True)
class Prepared:
    """Inputs ready for the model: token ids (special tokens included), in input order."""

    ids: list[list[int]]
    truncated: list[int] = field(default_factory=list)  # indices of inputs cut at the token limit
    texts: list[str] | None = None  # the exact strings the model saw; None for caller-supplied ids
    spans: list[Spans] | None = None  # per input, each token's piece and offsets in ``texts`` (when asked for)

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.ids)

    def __len__(self) -> int:
        return len(self.ids)


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """``texts`` as a list of str (a single string becomes one item); other items raise TypeError."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, np.ndarray):
        texts = texts.tolist()
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"input {i} is a {type(t).__name__}, expected str")
    return out


def prepare(
    engine: "Engine",
    texts: str | Sequence[str],
    input_type: InputType | None = None,
    *,
    prompt_style: str | None = None,
    task: str | None = None,
    truncate: bool = True,
    max_tokens: int | None = None,
    spans: bool = False,
) -> Prepared:
    """Format ``texts`` by the prompt convention and tokenize them.

    ``input_type``: "query", "passage", or None/"raw" (texts are used exactly as given).
    ``prompt_style``: "e5", "instruct" or "none" (default: the model's). ``task``: the instruction
    (or a known task name) for instruct models. ``max_tokens`` lowers the model's token limit.
    Over-long inputs are cut (their indices in ``Prepared.truncated``), or raise
    :class:`~e5kit.engine.InputTooLongError` with ``truncate=False``. ``spans``: also each token's
    piece and character offsets in the formatted text (``Prepared.spans``, what ``/tokenize`` shows).
    """
    batch = as_text_list(texts)
    style = prompt_style or engine.spec.prompt_style
    formatted = batch if input_type in (None, "raw") else format_texts(batch, input_type, style, task)
    tok = engine.tokenize(formatted, truncate=truncate, max_tokens=max_tokens, spans=spans)
    return Prepared(ids=tok.ids, truncated=tok.truncated, texts=formatted, spans=tok.spans)


def prepare_ids(engine: "Engine", seqs: Sequence[Sequence[int]], *, truncate: bool = True,
                max_tokens: int | None = None) -> Prepared:
    """Caller-supplied token ids, validated (vocabulary range, length) and cut if allowed."""
    tok = engine.check_ids(seqs, truncate=truncate, max_tokens=max_tokens)
    return Prepared(ids=tok.ids, truncated=tok.truncated, texts=None)


def embed(
    engine: "Engine",
    prepared: Prepared,
    *,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """(n, dim) mean-pooled float32 vectors on the CPU, unnormalised, rows in input order.

    ``on_batch(n_inputs, n_tokens)`` is called after every forward pass.
    """
    return engine.embed_ids(prepared.ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                            progress=progress, on_batch=on_batch)


def finish(
    vectors: np.ndarray | torch.Tensor,
    *,
    normalize: bool = True,
    dimensions: int | None = None,
    precision: Precision = "float32",
    ranges: np.ndarray | None = None,
) -> np.ndarray:
    """Pooled vectors -> what the caller gets: L2-normalised (``normalize``), cut to the first
    ``dimensions`` components (Matryoshka-style; renormalised when ``normalize``), in ``precision``
    (see :func:`quantize_embeddings`; ``ranges`` fixes the int8/uint8 range)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    t = torch.as_tensor(vectors, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"expected an (n, dim) array of vectors, got shape {tuple(t.shape)}")
    if dimensions is not None:
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise ValueError(f"dimensions must be a positive integer, not {dimensions!r}")
        if dimensions > t.shape[1]:
            raise ValueError(f"dimensions is {dimensions} but the embeddings have {t.shape[1]}")
    if normalize:
        t = F.normalize(t, p=2, dim=-1)
    out = t.numpy()
    if dimensions is not None and dimensions < out.shape[1]:
        out = out[:, :dimensions]
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        out = np.ascontiguousarray(out, dtype=np.float32)
    return quantize_embeddings(out, precision, ranges) if precision != "float32" else out


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


__all__ = ["Prepared", "prepare", "prepare_ids", "embed", "finish", "quantize_embeddings", "as_text_list",
           "Precision", "PRECISIONS"]
