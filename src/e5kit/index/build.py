"""Corpus files (jsonl / csv / parquet) and the resumable build of an index from one.

A build embeds the corpus in fixed parts of documents, in file order. Each finished part is
written crash-safely to ``OUT/.build/part-NNNNNN.npz``; a rerun after an interruption checks that
the corpus and settings are unchanged, skips the finished parts and carries on, so the final index
has every id exactly once. The index itself is written only after the last part, and the staging
folder is removed after that.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, NamedTuple, Sequence

from ..prompts import beir_document
from .core import Index, check_options, chunk_rows
from .faiss_backends import TooFewVectorsError, ivfpq_shape
from .storage import MANIFEST, atomic_write, fingerprint, model_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..api import E5
    from ..chunking import LongMode

FORMATS = ("jsonl", "csv", "parquet")
STAGING = ".build"


class CorpusError(ValueError):
    """The corpus file cannot be read as asked (format, fields, duplicate or empty ids)."""


def corpus_format(path: Path, fmt: str | None = None) -> str:
    if fmt and fmt != "auto":
        if fmt not in FORMATS:
            raise CorpusError(f"unknown corpus format {fmt!r}; expected one of {FORMATS}")
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    for s in reversed(suffixes):
        if s in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if s in (".csv", ".tsv"):
            return "csv"
        if s in (".parquet", ".pq"):
            return "parquet"
    raise CorpusError(f"cannot tell the format of {path} from its name; pass --format jsonl, csv or parquet")


def iter_records(path: Path, fmt: str) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record of the corpus, in file order."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(rec, dict):
                    raise CorpusError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
                yield f"{path}:{n}", rec
    elif fmt == "csv":
        with open(path, encoding="utf-8", newline="") as f:
            dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
            for n, rec in enumerate(csv.DictReader(f, dialect=dialect), 2):
                yield f"{path}:{n}", rec
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise CorpusError(f"{path} is not a readable parquet file ({e})") from e
        n = 0
        for batch in pf.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                n += 1
                yield f"{path} row {n}", rec


class Document(NamedTuple):
    id: str
    title: str | None
    text: str
    metadata: dict | None

    @property
    def embed_text(self) -> str:
        """The document as the E5 authors embed it (before the prefix): title + ' ' + text."""
        return beir_document(self.title, self.text)


def read_document(where: str, rec: dict, *, id_field: str | None = None, title_field: str | None = "title",
                  text_field: str = "text", metadata_fields: tuple[str, ...] = (), store_text: bool = True,
                  error: type[Exception] = CorpusError) -> Document:
    """One corpus record -> a :class:`Document`: the id (``id_field``, else ``_id`` or ``id``), the text,
    an optional title, the chosen metadata (plus title/text when ``store_text``). ``where`` names the
    record in the ``error`` raised for a missing id or text. Shared by ``index build`` and ``embed-corpus``."""
    field = id_field or ("_id" if "_id" in rec else "id")
    doc_id = rec.get(field)
    if doc_id is None or str(doc_id).strip() == "":
        what = f"field {field!r}" if id_field or field == "_id" else "field '_id' or 'id'"
        raise error(f"{where}: no id in {what} (choose the field with --id-field)")
    text = rec.get(text_field)
    if not isinstance(text, str):
        raise error(f"{where}: no string field {text_field!r} (choose it with --text-field)")
    title = rec.get(title_field) if title_field else None
    title = title if isinstance(title, str) else None
    meta: dict = {f: rec.get(f) for f in metadata_fields}
    if store_text:
        if title:
            meta["title"] = title
        meta["text"] = text
    return Document(str(doc_id), title, text, meta or None)


class Corpus:
    """A corpus file read as (id, title, text, metadata) documents."""

    def __init__(self, path: str | os.PathLike, fmt: str | None = None, id_field: str | None = None,
                 title_field: str | None = "title", text_field: str = "text",
                 metadata_fields: tuple[str, ...] = (), store_text: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise CorpusError(f"{self.path} does not exist or is not a file")
        self.fmt = corpus_format(self.path, fmt)
        self.id_field, self.title_field, self.text_field = id_field, title_field, text_field
        self.metadata_fields, self.store_text = tuple(metadata_fields), store_text

    def __iter__(self) -> Iterator[Document]:
        for where, rec in iter_records(self.path, self.fmt):
            yield read_document(where, rec, id_field=self.id_field, title_field=self.title_field,
                                text_field=self.text_field, metadata_fields=self.metadata_fields,
                                store_text=self.store_text)

    def fingerprint(self) -> dict:
        """What identifies this corpus file for resuming: its path and :func:`fingerprint`."""
        return {"path": str(self.path.resolve()), "fingerprint": fingerprint([self.path])}

    def scan(self) -> int:
        """Check every record (ids present and unique, text present); returns the document count."""
        seen: dict[str, int] = {}
        for n, (doc_id, *_) in enumerate(self, 1):
            if doc_id in seen:
                raise CorpusError(f"{self.path}: id {doc_id!r} appears twice (documents {seen[doc_id]} and {n}); "
                                  f"ids must be unique")
            seen[doc_id] = n
        if not seen:
            raise CorpusError(f"{self.path} holds no documents")
        return len(seen)


def _parts(corpus: Corpus, size: int) -> Iterator[list[Document]]:
    buf = []
    for doc in corpus:
        buf.append(doc)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def _write_part(path: Path, ids: list[str], meta: list, vectors) -> None:
    import numpy as np

    def write(f):
        np.savez(f, vectors=vectors, ids=np.array(ids, dtype=str),
                 meta=np.array([json.dumps(m, ensure_ascii=False) for m in meta], dtype=str))

    atomic_write(path, write)


def _read_part(path: Path):
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        return z["vectors"], [str(i) for i in z["ids"]], [json.loads(str(m)) for m in z["meta"]]


def build_index(
    corpus: Corpus,
    out: str | os.PathLike,
    model: "E5",
    *,
    part_size: int = 1024,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    index_options: dict | None = None,
    progress: bool | None = None,
    force: bool = False,
    long: "LongMode" = "truncate",
    chunk_overlap: int = 64,
    on_part: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> Index:
    """Embed ``corpus`` into an index at ``out``, resuming an interrupted build of the same corpus.

    ``part_size`` documents are embedded and staged at a time (the unit of resuming);
    ``on_part(n)`` is called after part ``n`` is staged. ``long``: "truncate" documents longer than
    the model reads, index them whole as "chunks" (a chunked index: :func:`e5kit.chunk`, title on
    each chunk, ``chunk_overlap`` tokens of overlap), or as the "mean" of their chunks (one
    vector per document; see :func:`embed_documents`).
    """
    from ..chunking import LONG_MODES

    if long not in LONG_MODES:
        raise ValueError(f"long must be one of {LONG_MODES}, not {long!r}")
    out = Path(out)
    staging = out / STAGING
    index_options = dict(index_options or {})
    state = {
        "corpus": corpus.fingerprint(),
        "fields": [corpus.fmt, corpus.id_field, corpus.title_field, corpus.text_field,
                   list(corpus.metadata_fields), corpus.store_text],
        "model": model.name, "model_fingerprint": model_fingerprint(model), "prompt_style": model.prompt_style,
        "part_size": part_size, "long": long,
        "chunk_overlap": chunk_overlap if long != "truncate" else None,
    }  # what the staged vectors depend on (not the index options: a rerun may change those and reuse them)
    if (out / MANIFEST).exists() and not staging.exists() and not force:
        raise CorpusError(f"{out} already holds a finished index; pass --force to rebuild it")
    n_docs = corpus.scan()  # a bad corpus fails here, before anything is written
    # impossible index settings fail here too (a chunked index's vector count is known only once chunked:
    # if it is too small for them, the embedded parts stay staged for a rerun with other options)
    check_index_options(index_options, n_docs if long != "chunks" else None, model.dim)
    if staging.exists():
        try:
            old = json.loads((staging / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            old.pop("index_options", None)  # older builds kept it; the vectors do not depend on it
        if old != state:
            if not force:
                what = ("a different corpus file or version" if old and old.get("corpus") != state["corpus"]
                        else "different settings" if old else "an unreadable state file")
                raise CorpusError(f"{staging} holds an interrupted build of {what}; rerun with the same corpus "
                                  f"and options to resume, or pass --force to start over")
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    atomic_write(staging / "state.json", lambda f: f.write(json.dumps(state, indent=2).encode()))
    for tmp in staging.glob(".*.tmp"):  # a part being written when the last run died
        tmp.unlink()

    n_parts = (n_docs + part_size - 1) // part_size
    done = set()
    for p in staging.glob("part-*.npz"):
        try:
            vec, ids, _ = _read_part(p)
            if len(ids) == len(vec):
                done.add(int(p.stem.split("-")[1]))
                continue
        except Exception:  # noqa: BLE001 - any unreadable part is simply redone
            pass
        p.unlink()
    docs_done = sum(min(part_size, n_docs - c * part_size) for c in done)
    if done:
        log(f"resuming: {len(done)} of {n_parts} parts ({docs_done} documents) already embedded")

    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_docs, initial=docs_done, unit="doc", desc="indexing", dynamic_ncols=True)
    tokens, t0, truncated, shown = 0, time.perf_counter(), 0, float(docs_done)

    def on_batch(docs: float, ntok: int) -> None:
        nonlocal tokens, shown
        tokens += ntok
        if bar is not None:
            shown += docs
            bar.update(int(round(shown)) - bar.n)
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

    try:
        for c, part in enumerate(_parts(corpus, part_size)):
            if c in done:
                continue
            rows = embed_documents(model, part, long, chunk_overlap, batch_size=batch_size,
                                   max_batch_tokens=max_batch_tokens, on_batch=on_batch)
            truncated += rows.truncated
            _write_part(staging / f"part-{c:06d}.npz", rows.ids, rows.metadata, rows.vectors)
            if on_part is not None:
                on_part(c)
    finally:
        if bar is not None:
            bar.close()
    if truncated:
        log(f"warning: {truncated} document(s) longer than {model.max_tokens} tokens were truncated "
            f"(--long chunks or mean embeds them whole)")

    index = Index(model, chunked=long == "chunks", **index_options)
    for c in range(n_parts):
        vec, ids, meta = _read_part(staging / f"part-{c:06d}.npz")
        index.add(ids, embeddings=vec, metadata=meta)
    n_indexed = len(index.documents()) if index.chunked else len(index)
    if n_indexed != n_docs:  # pragma: no cover - guarded by the scan and the per-part ids
        raise CorpusError(f"assembled {n_indexed} documents, expected {n_docs}; rerun to resume")
    index.save(out)
    shutil.rmtree(staging)
    return index


class EmbeddedRows(NamedTuple):
    ids: list[str]
    metadata: list[dict | None]
    vectors: "np.ndarray"  # (len(ids), dim) float32, unit length
    n_tokens: int  # tokens embedded (prefix and special tokens included)
    truncated: int  # documents cut at the model's limit (long="truncate" only)


def embed_documents(model: "E5", docs: Sequence[Document], long: "LongMode" = "truncate", overlap: int = 64, *,
                    batch_size: int = 32, max_batch_tokens: int = 16384,
                    on_batch: Callable[[float, int], None] | None = None) -> EmbeddedRows:
    """The rows of ``docs`` for an index or a store, through the one pipeline.

    ``long="truncate"``: one row per document, ``title text`` cut at the model's limit, as
    ``encode_passages``. ``"mean"``: one row per document, the normalised mean of its chunks
    (:func:`e5kit.chunk`, title repeated on every chunk, ``overlap`` tokens), as
    ``encode_passages(texts, long="mean", titles=titles)``. ``"chunks"``: one row per chunk, id
    ``doc#n``, with the document id and the chunk's span in its metadata (:func:`chunk_rows`).
    ``on_batch(documents, tokens)`` after every forward pass (documents as a fraction when chunked)."""
    from ..chunking import LONG_MODES, chunk, finish_chunks
    from ..pipeline import finish

    if long not in LONG_MODES:
        raise ValueError(f"long must be one of {LONG_MODES}, not {long!r}")
    docs = list(docs)
    ids, meta = [d.id for d in docs], [d.metadata for d in docs]
    if long == "truncate":
        flat = None
        prepared = model.prepare([d.embed_text for d in docs], "passage", truncate=True)
    else:
        per_doc = chunk([d.text for d in docs], model, overlap=overlap, titles=[d.title for d in docs])
        flat = [c for cs in per_doc for c in cs]
        if long == "chunks":
            ids, meta = [], []
            for d, chunks in zip(docs, per_doc):
                r_ids, r_meta = chunk_rows(d.id, d.text, chunks, d.metadata)
                ids += r_ids
                meta += r_meta
        prepared = model.prepare([c.text for c in flat], "passage", truncate=False)  # chunks always fit
    share = len(docs) / max(len(prepared), 1)
    progress = None if on_batch is None else (lambda n, ntok: on_batch(n * share, ntok))
    pooled = model.embed(prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens, on_batch=progress)
    if flat is None:
        vectors = finish(pooled)
    else:
        out = finish_chunks(pooled, flat, len(docs), long)
        vectors = out.vectors if long == "chunks" else out
    return EmbeddedRows(ids, meta, vectors, prepared.n_tokens, len(prepared.truncated))


def check_index_options(options: dict, n_vectors: int | None, dim: int) -> None:
    """Raise ValueError now for index settings that could only fail after the corpus is embedded
    (``n_vectors``: how many the index will hold, None if not known yet)."""
    check_options(options.get("kind", "exact"), options.get("storage", "float32"), options.get("metric", "cosine"))
    if options.get("kind") == "ivfpq":
        params = {"nlist": options.get("nlist"), "pq_m": options.get("pq_m"), "pq_bits": options.get("pq_bits", 8)}
        ivfpq_shape(1 << 40 if n_vectors is None else n_vectors, dim, params)  # unknown count: pq_m only


__all__ = ["Corpus", "CorpusError", "Document", "EmbeddedRows", "build_index", "embed_documents", "check_index_options",
           "TooFewVectorsError"]
