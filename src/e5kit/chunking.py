"""Long text: split passages into windows the model reads whole, and embed them.

E5 reads at most 512 tokens, *including* the ``passage: `` prefix and the special tokens.
:func:`chunk` splits each text on the model's own tokenizer into windows that fit that budget,
with ``overlap`` tokens shared between neighbours, cutting at a paragraph, sentence or word boundary
near the end of the window when there is one. Every chunk keeps its character span in the source
text; no chunk is ever truncated (each one is checked by tokenizing exactly what the model will
see). :func:`encode_long` embeds the chunks, per chunk or as one mean vector per text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from .prompts import InputType, format_text

if TYPE_CHECKING:  # pragma: no cover
    from .api import E5

LongMode = Literal["truncate", "chunks", "mean"]
LONG_MODES = ("truncate", "chunks", "mean")
SENTENCE_END = ".!?;:。！？；…"


@dataclass(frozen=True)
class Chunk:
    """One window of a text: what is embedded (before the prompt prefix) and where it came from."""

    text: str  # the title (when repeated) + " " + the source text over ``span``
    span: tuple[int, int]  # [start, end) character offsets in the source text
    n_tokens: int  # tokens the model sees: prefix, title and special tokens included
    doc: int = 0  # index of the source text in the call
    index: int = 0  # position of the chunk within its text


@dataclass(frozen=True)
class ChunkedEmbeddings:
    """Per-chunk vectors of several texts: row ``i`` embeds ``chunks[i]`` of text ``doc[i]``."""

    vectors: np.ndarray  # (n_chunks, dim)
    doc: np.ndarray  # (n_chunks,) int: the index of the source text
    spans: np.ndarray  # (n_chunks, 2) int: character spans in the source text
    chunks: list[Chunk]

    def __len__(self) -> int:
        return len(self.chunks)


def chunk(
    texts: str | Sequence[str],
    model: "E5",
    *,
    overlap: int = 64,
    titles: Sequence[str | None] | None = None,
    repeat_title: bool = True,
    max_tokens: int | None = None,
    input_type: InputType = "passage",
    window: float = 0.25,
) -> list[Chunk] | list[list[Chunk]]:
    """Split ``texts`` into chunks that ``model`` reads whole, with their character spans.

    ``overlap``: tokens shared by consecutive chunks (moved back to the start of a word).
    ``titles``: one title per text (BEIR style), put before the chunk text on every chunk
    (``repeat_title=False``: on the first only); spans always refer to the text itself.
    ``max_tokens``: the budget per chunk (default and at most: the model's limit), counting the
    prompt prefix of ``input_type`` and the special tokens. ``window``: the fraction of a window,
    from its end, searched for a paragraph / sentence / word boundary to cut at.
    A single string gives its list of chunks; a list gives one list per text. Every text, even an
    empty or whitespace-only one, gives at least one chunk.
    """
    single = isinstance(texts, str)
    items = [texts] if single else list(texts)
    if titles is not None:
        titles = list(titles)
        if len(titles) != len(items):
            raise ValueError(f"{len(items)} texts but {len(titles)} titles")
    limit = model.max_tokens if max_tokens is None else min(int(max_tokens), model.max_tokens)
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, not {overlap}")
    if not 0 < window <= 1:
        raise ValueError(f"window must be in (0, 1], not {window}")
    chunker = _Chunker(model, limit, overlap, input_type, window)
    out = []
    for d, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"input {d} is a {type(text).__name__}, expected str")
        title = titles[d] if titles is not None else None
        out.append([Chunk(c.text, c.span, c.n_tokens, d, i)
                    for i, c in enumerate(chunker.split(text, title or None, repeat_title))])
    return out[0] if single else out


class _Chunker:
    def __init__(self, model: "E5", limit: int, overlap: int, input_type: InputType, window: float):
        self.model, self.limit, self.overlap, self.window = model, limit, overlap, window
        self.input_type = input_type
        self.tokenizer = model.engine.untruncated_tokenizer()

    def seen(self, body: str, title: str | None) -> str:
        """The exact string the model sees for a chunk (before special tokens)."""
        text = f"{title} {body}" if title else body
        return format_text(text, self.input_type, self.model.prompt_style)

    def count(self, strings: list[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(strings, add_special_tokens=True)]

    def split(self, text: str, title: str | None, repeat_title: bool) -> list[Chunk]:
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        offsets = [o for o, t in zip(enc.offsets, enc.ids) if o[1] > o[0]] or []
        n = len(offsets)
        overhead_first, overhead_rest = self.count([self.seen("", title), self.seen("", title if repeat_title else None)])
        chunks: list[Chunk] = []
        a = 0
        while True:
            t = title if (not chunks or repeat_title) else None
            budget = self.limit - (overhead_first if not chunks else overhead_rest)
            if budget < 1:
                raise ValueError(f"the prompt prefix and title alone take {self.limit - budget} of the "
                                 f"{self.limit} tokens; shorten the title or don't repeat it")
            if chunks and self.overlap >= budget:
                raise ValueError(f"overlap={self.overlap} leaves no room in {budget}-token windows")
            start = 0 if not chunks else offsets[a][0]
            stop = a + budget  # first token not in the window, before verification
            while True:
                last = stop >= n
                j = n if last else self.cut(text, offsets, a, stop, budget)
                end = len(text) if last else offsets[j][0]
                body = text[start:end]
                n_tok = self.count([self.seen(body, t)])[0]
                if n_tok <= self.limit:
                    break
                stop = j - (n_tok - self.limit)  # the text's context tokenized a little longer: shrink
                if stop <= a:
                    raise ValueError(f"{text[start:end]!r} does not fit in {self.limit} tokens with its prefix")
            chunks.append(Chunk(f"{t} {body}" if t else body, (start, end), n_tok))
            if last:
                return chunks
            a = self.next_start(text, offsets, a, j)

    def cut(self, text: str, offsets: list[tuple[int, int]], a: int, stop: int, budget: int) -> int:
        """The token to end before: the best boundary in the window's last ``window`` fraction."""
        lo = max(a + 1, stop - max(1, int(budget * self.window)))
        best, best_rank = stop, 0
        for j in range(stop, lo - 1, -1):
            rank = _boundary_rank(text, offsets, j)
            if rank > best_rank:
                best, best_rank = j, rank
                if rank == 4:
                    break
        return best

    def next_start(self, text: str, offsets: list[tuple[int, int]], a: int, j: int) -> int:
        """Where the next chunk starts: ``overlap`` tokens before ``j``, moved back to a word start."""
        s = max(a + 1, j - self.overlap)
        if s == j:
            return s
        for back in range(s, max(a + 1, s - 16) - 1, -1):  # words are short; never scan far
            if _boundary_rank(text, offsets, back) >= 1:
                return back
        return s


def _boundary_rank(text: str, offsets: list[tuple[int, int]], j: int) -> int:
    """How good a cut before token ``j`` is: 4 paragraph, 3 line, 2 sentence, 1 word, 0 mid-word."""
    prev_end, (s, _) = offsets[j - 1][1], offsets[j]
    k = s
    while k < len(text) and text[k].isspace():  # SentencePiece tokens carry their leading space
        k += 1
    gap = text[prev_end:k]
    if "\n" in gap:
        return 4 if gap.count("\n") >= 2 else 3
    last = text[prev_end - 1] if prev_end > 0 else ""
    if last in SENTENCE_END and (gap or last in "。！？；…"):
        return 2
    return 1 if gap else 0


def encode_long(
    model: "E5",
    texts: str | Sequence[str],
    long: LongMode,
    *,
    overlap: int = 64,
    titles: Sequence[str | None] | None = None,
    batch_size: int = 32,
    normalize_embeddings: bool = True,
    show_progress_bar: bool | None = None,
    precision: str = "float32",
    max_batch_tokens: int = 16384,
) -> ChunkedEmbeddings | np.ndarray:
    """Embed passages of any length: ``long="chunks"`` gives every chunk's vector with its span,
    ``long="mean"`` one vector per text, the normalised mean of its chunk vectors."""
    if long not in ("chunks", "mean"):
        raise ValueError(f"long must be one of {LONG_MODES}, not {long!r}")
    single = isinstance(texts, str)
    per_text = chunk([texts] if single else texts, model, overlap=overlap, titles=titles)
    flat = [c for cs in per_text for c in cs]
    prepared = model.prepare([c.text for c in flat], "passage", truncate=False)  # chunks always fit
    pooled = model.embed(prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                         progress=show_progress_bar)
    out = finish_chunks(pooled, flat, len(per_text), long, normalize=normalize_embeddings, precision=precision)
    if long == "chunks":
        return out
    return out[0] if single else out


def finish_chunks(pooled, chunks: Sequence[Chunk], n_texts: int, long: LongMode, **finish_options
                  ) -> ChunkedEmbeddings | np.ndarray:
    """Pooled vectors of ``chunks`` (of ``n_texts`` texts, in order) -> what ``long`` gives:
    :class:`ChunkedEmbeddings` ("chunks"), or one vector per text ("mean": the mean of its chunks'
    unit vectors). ``finish_options`` go to :func:`e5kit.pipeline.finish` (normalize, dimensions, precision, ...)."""
    from .pipeline import finish

    if long not in ("chunks", "mean"):
        raise ValueError(f"long must be 'chunks' or 'mean' here, not {long!r}")
    chunks = list(chunks)
    doc = np.array([c.doc for c in chunks], dtype=np.int64)
    if long == "mean":
        return finish(mean_of_chunks(finish(pooled), doc, n_texts), **finish_options)
    spans = np.array([c.span for c in chunks], dtype=np.int64).reshape(-1, 2)
    return ChunkedEmbeddings(finish(pooled, **finish_options), doc, spans, chunks)


def mean_of_chunks(unit_vectors: np.ndarray, doc: np.ndarray, n_docs: int) -> np.ndarray:
    """One vector per document: the mean of its chunks' unit vectors (normalise it to use it)."""
    sums = np.zeros((n_docs, unit_vectors.shape[1]), dtype=np.float32)
    np.add.at(sums, doc, unit_vectors)
    return sums / np.maximum(np.bincount(doc, minlength=n_docs), 1)[:, None]


__all__ = ["chunk", "Chunk", "ChunkedEmbeddings", "encode_long", "finish_chunks", "mean_of_chunks", "LONG_MODES"]
