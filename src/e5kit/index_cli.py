"""``e5kit index build`` (resumable corpus indexing) and ``e5kit search``.

A build embeds the corpus in fixed chunks of documents, in file order. Each finished chunk is
written crash-safely to ``OUT/.build/part-NNNNNN.npz``; a rerun after an interruption checks that
the corpus and settings are unchanged, skips the finished chunks and carries on, so the final index
has every id exactly once. The index itself is written only after the last chunk, and the staging
folder is removed after that.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import click

from .cli import load_model, model_options

if TYPE_CHECKING:  # pragma: no cover
    from .api import E5
    from .index import Index

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

    def __iter__(self) -> Iterator[tuple[str, str, dict | None]]:
        """(id, document text as the E5 authors embed it: title + ' ' + text, metadata)."""
        from .prompts import beir_document

        for where, rec in iter_records(self.path, self.fmt):
            id_field = self.id_field or ("_id" if "_id" in rec else "id")
            doc_id = rec.get(id_field)
            if doc_id is None or str(doc_id).strip() == "":
                raise CorpusError(f"{where}: no id in field {id_field!r} (choose the field with --id-field)")
            text = rec.get(self.text_field)
            if not isinstance(text, str):
                raise CorpusError(f"{where}: no string field {self.text_field!r} (choose it with --text-field)")
            title = rec.get(self.title_field) if self.title_field else None
            title = title if isinstance(title, str) else None
            meta: dict = {f: rec.get(f) for f in self.metadata_fields}
            if self.store_text:
                if title:
                    meta["title"] = title
                meta["text"] = text
            yield str(doc_id), beir_document(title, text), (meta or None)

    def fingerprint(self) -> dict:
        """What identifies this corpus file for resuming: size, and digests of its head and tail."""
        size = self.path.stat().st_size
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
        return {"path": str(self.path.resolve()), "bytes": size, "sha256_head_tail": h.hexdigest()}

    def scan(self) -> int:
        """Check every record (ids present and unique, text present); returns the document count."""
        seen: dict[str, int] = {}
        for n, (doc_id, _, _) in enumerate(self, 1):
            if doc_id in seen:
                raise CorpusError(f"{self.path}: id {doc_id!r} appears twice (documents {seen[doc_id]} and {n}); "
                                  f"ids must be unique")
            seen[doc_id] = n
        if not seen:
            raise CorpusError(f"{self.path} holds no documents")
        return len(seen)


def _chunks(corpus: Corpus, size: int) -> Iterator[list[tuple[str, str, dict | None]]]:
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

    from .index import atomic_write

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
    chunk_size: int = 1024,
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    index_options: dict | None = None,
    progress: bool | None = None,
    force: bool = False,
    on_chunk: Callable[[int], None] | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> "Index":
    """Embed ``corpus`` into an index at ``out``, resuming an interrupted build of the same corpus."""
    from .index import MANIFEST, Index, model_fingerprint
    from .pipeline import finish

    out = Path(out)
    staging = out / STAGING
    index_options = dict(index_options or {})
    state = {
        "corpus": corpus.fingerprint(),
        "fields": [corpus.fmt, corpus.id_field, corpus.title_field, corpus.text_field,
                   list(corpus.metadata_fields), corpus.store_text],
        "model": model.name, "model_fingerprint": model_fingerprint(model), "prompt_style": model.prompt_style,
        "chunk_size": chunk_size, "index_options": index_options,
    }
    if (out / MANIFEST).exists() and not staging.exists() and not force:
        raise CorpusError(f"{out} already holds a finished index; pass --force to rebuild it")
    n_docs = corpus.scan()  # a bad corpus fails here, before anything is written
    if staging.exists():
        try:
            old = json.loads((staging / "state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != state:
            if not force:
                what = ("a different corpus file or version" if old and old.get("corpus") != state["corpus"]
                        else "different settings" if old else "an unreadable state file")
                raise CorpusError(f"{staging} holds an interrupted build of {what}; rerun with the same corpus "
                                  f"and options to resume, or pass --force to start over")
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    from .index import atomic_write

    atomic_write(staging / "state.json", lambda f: f.write(json.dumps(state, indent=2).encode()))
    for tmp in staging.glob(".*.tmp"):  # a chunk being written when the last run died
        tmp.unlink()

    n_chunks = (n_docs + chunk_size - 1) // chunk_size
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
    docs_done = sum(min(chunk_size, n_docs - c * chunk_size) for c in done)
    if done:
        log(f"resuming: {len(done)} of {n_chunks} chunks ({docs_done} documents) already embedded")

    bar = None
    if progress is None:
        progress = sys.stderr.isatty()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_docs, initial=docs_done, unit="doc", desc="indexing", dynamic_ncols=True)
    tokens, t0, truncated = 0, time.perf_counter(), 0
    try:
        for c, chunk in enumerate(_chunks(corpus, chunk_size)):
            if c in done:
                continue
            ids, texts, meta = zip(*chunk)
            prepared = model.prepare(list(texts), "passage", truncate=True)
            truncated += len(prepared.truncated)

            def on_batch(n: int, ntok: int) -> None:
                nonlocal tokens
                tokens += ntok
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)

            vec = finish(model.embed(prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                     on_batch=on_batch))
            _write_part(staging / f"part-{c:06d}.npz", list(ids), list(meta), vec)
            if on_chunk is not None:
                on_chunk(c)
    finally:
        if bar is not None:
            bar.close()
    if truncated:
        log(f"warning: {truncated} document(s) longer than {model.max_tokens} tokens were truncated")

    index = Index(model, **index_options)
    for c in range(n_chunks):
        vec, ids, meta = _read_part(staging / f"part-{c:06d}.npz")
        index.add(ids, embeddings=vec, metadata=meta)
    if len(index) != n_docs:  # pragma: no cover - guarded by the scan and the per-chunk ids
        raise CorpusError(f"assembled {len(index)} documents, expected {n_docs}; rerun to resume")
    index.save(out)
    shutil.rmtree(staging)
    return index


# ---- click --------------------------------------------------------------------------------------


@click.group("index")
def index():
    """Build a searchable index of a corpus."""


@index.command("build")
@click.argument("corpus", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--format", "fmt", type=click.Choice(("auto",) + FORMATS), default="auto", show_default=True)
@click.option("--id-field", default=None, help="Field holding the document id [default: _id if present, else id].")
@click.option("--title-field", default="title", show_default=True, help="Field holding the title ('' for none).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--metadata-field", "metadata_fields", multiple=True, help="Extra field to keep as metadata (repeatable).")
@click.option("--no-store-text", is_flag=True, help="Do not keep title/text in the index's metadata.")
@click.option("--index-type", "index_backend", type=click.Choice(["exact", "hnsw", "ivfpq"]), default="exact",
              show_default=True, help="Search backend: exact, or FAISS hnsw / ivfpq (need faiss-cpu).")
@click.option("--storage", type=click.Choice(["float32", "int8", "binary"]), default="float32", show_default=True,
              help="Stored vector precision for the first search pass (rescored with float vectors).")
@click.option("--chunk-size", default=1024, show_default=True, help="Documents per resumable chunk.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--force", is_flag=True, help="Rebuild from scratch, discarding an existing or interrupted build.")
@model_options
def build(corpus, out, fmt, id_field, title_field, text_field, metadata_fields, no_store_text, index_backend,
          storage, chunk_size, batch_size, force, model, device, dtype, backend, threads):
    """Embed CORPUS (jsonl, csv or parquet) into an index at --out. Rerun to resume after an interruption.

    \b
    e5kit index build corpus.jsonl --out my-index -m intfloat/e5-small-v2
    e5kit index build docs.parquet --out my-index --id-field doc_id --text-field body --index-type hnsw
    """
    from .index import IndexFileError

    if chunk_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--chunk-size")
    try:
        c = Corpus(corpus, fmt, id_field, title_field or None, text_field, metadata_fields, not no_store_text)
        m = load_model(model, device, dtype, backend, threads)
        idx = build_index(c, out, m, chunk_size=chunk_size, batch_size=batch_size,
                          index_options={"backend": index_backend, "storage": storage}, force=force,
                          log=lambda msg: click.echo(msg, err=True))
    except (CorpusError, IndexFileError, ValueError) as e:
        raise click.ClickException(str(e))
    click.echo(f"indexed {len(idx)} documents ({idx.dim}-d, {index_backend}, {storage}) into {out}", err=True)


@click.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "--top-k", "k", default=10, show_default=True)
@click.option("--task", default=None, help="Task name or instruction for instruct models.")
@click.option("--output-format", "--format", "output_format", type=click.Choice(["table", "jsonl"]), default="table",
              show_default=True)
@click.option("--ef-search", type=int, default=None, help="HNSW search breadth (recall vs speed).")
@click.option("--nprobe", type=int, default=None, help="IVF lists to visit (recall vs speed).")
@model_options
def search(index_dir, queries, k, task, output_format, ef_search, nprobe, model, device, dtype, backend, threads):
    """Search the index at INDEX_DIR for each of QUERIES (the model defaults to the index's own).

    \b
    e5kit search my-index "how much protein should a female eat" -k 5
    """
    from .index import Index, IndexFileError, IndexMismatchError, read_manifest

    ctx = click.get_current_context()
    try:
        manifest = read_manifest(Path(index_dir))
        if ctx.get_parameter_source("model") == click.core.ParameterSource.DEFAULT and manifest.get("model"):
            model = manifest["model"]
        m = load_model(model, device, dtype, backend, threads)
        idx = Index.load(index_dir, m)
        results = idx.search(list(queries), k=k, task=task, ef_search=ef_search, nprobe=nprobe)
    except (IndexFileError, IndexMismatchError, ValueError) as e:
        raise click.ClickException(str(e))
    if output_format == "jsonl":
        for q, hits in zip(queries, results):
            for rank, h in enumerate(hits, 1):
                click.echo(json.dumps({"query": q, "rank": rank, **h.as_dict()}, ensure_ascii=False))
        return
    width = shutil.get_terminal_size((120, 20)).columns
    for q, hits in zip(queries, results):
        click.echo(f"query: {q}")
        rows = [("rank", "score", "id", "text")]
        for rank, h in enumerate(hits, 1):
            meta = h.metadata or {}
            snippet = " ".join(str(x) for x in (meta.get("title"), meta.get("text")) if x)
            rows.append((str(rank), f"{h.score:.4f}", h.id, snippet.replace("\n", " ")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for j, r in enumerate(rows):
            line = "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  "
            line += r[3][: max(10, width - len(line) - 1)]
            click.echo(line.rstrip())
            if j == 0:
                click.echo("  ".join("-" * w for w in widths + [4]))
        click.echo("")
