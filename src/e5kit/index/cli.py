"""``e5kit index build`` (resumable corpus indexing) and ``e5kit search``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from ..cli import load_model, model_options
from .build import FORMATS, STAGING, Corpus, CorpusError, build_index, check_index_options
from .faiss_backends import TooFewVectorsError
from .storage import IndexFileError


@click.group("index")
def index():
    """Build a searchable index of a corpus."""


def _deprecated_chunk_size(ctx, param, value):
    if value is not None:
        click.echo("warning: --chunk-size is now --part-size (documents per resumable part)", err=True)
    return value


@index.command("build")
@click.argument("corpus", type=click.Path(dir_okay=False))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Index directory to write.")
@click.option("--format", "fmt", type=click.Choice(("auto",) + FORMATS), default="auto", show_default=True,
              help="Corpus format (auto: from the file name).")
@click.option("--id-field", default=None, help="Field holding the document id [default: _id if present, else id].")
@click.option("--title-field", default="title", show_default=True, help="Field holding the title ('' for none).")
@click.option("--text-field", default="text", show_default=True, help="Field holding the document text.")
@click.option("--metadata-field", "metadata_fields", multiple=True, help="Extra field to keep as metadata (repeatable).")
@click.option("--no-store-text", is_flag=True, help="Do not keep title/text in the index's metadata.")
@click.option("--index-type", "kind", type=click.Choice(["exact", "hnsw", "ivfpq"]), default="exact",
              show_default=True, help="Search kind: exact, or FAISS hnsw / ivfpq (need faiss-cpu).")
@click.option("--storage", type=click.Choice(["float32", "int8", "binary"]), default="float32", show_default=True,
              help="Stored vector precision for the first search pass (rescored with float vectors).")
@click.option("--part-size", type=int, default=1024, show_default=True,
              help="Documents embedded and staged at a time (the unit of resuming).")
@click.option("--chunk-size", "old_part_size", type=int, default=None, hidden=True, callback=_deprecated_chunk_size,
              help="Deprecated name of --part-size.")
@click.option("--long", "long_mode", type=click.Choice(["truncate", "chunks", "mean"]), default=None,
              help="Documents over the model's limit: truncate them [default], index them whole as chunks (search "
              "ranks documents by their best chunk), or store the mean of their chunks (one vector per document).")
@click.option("--chunk", is_flag=True, help="Same as --long chunks.")
@click.option("--chunk-overlap", type=int, default=64, show_default=True, help="With --long chunks/mean: tokens shared "
              "by neighbouring chunks.")
@click.option("--sink", "sinks", multiple=True, help="After the build, also load the vectors into this store "
              "(repeatable): postgresql://...?table=T, lancedb:DIR?table=T, or index:DIR (a copy of the index).")
@click.option("--batch-size", default=32, show_default=True, help="Texts per forward pass (at most).")
@click.option("--force", is_flag=True, help="Rebuild from scratch, discarding an existing or interrupted build.")
@model_options
def build(corpus, out, fmt, id_field, title_field, text_field, metadata_fields, no_store_text, kind,
          storage, part_size, old_part_size, long_mode, chunk, chunk_overlap, sinks, batch_size, force, model, device,
          dtype, backend, threads):
    """Embed CORPUS (jsonl, csv or parquet) into an index at --out. Rerun to resume after an interruption.

    \b
    e5kit index build corpus.jsonl --out my-index -m intfloat/e5-small-v2
    e5kit index build docs.parquet --out my-index --id-field doc_id --text-field body --index-type hnsw
    e5kit index build papers.jsonl --out papers-index --long chunks
    e5kit index build corpus.jsonl --out my-index --sink 'postgresql://localhost/db?table=docs' --sink lancedb:./ldb
    """
    from ..stores import StoreError, check_sink, load_rows, open_store

    if old_part_size is not None:
        part_size = old_part_size
    if part_size < 1:
        raise click.BadParameter("must be at least 1", param_hint="--part-size")
    if chunk_overlap < 0:
        raise click.BadParameter("must be at least 0", param_hint="--chunk-overlap")
    if chunk and long_mode not in (None, "chunks"):
        raise click.UsageError(f"--chunk means --long chunks; it contradicts --long {long_mode}")
    long_mode = "chunks" if chunk else long_mode or "truncate"
    options = {"kind": kind, "storage": storage}
    try:
        check_index_options(options, None, 8)  # kind x storage, before loading anything
    except ValueError as e:
        raise click.UsageError(str(e).replace("kind", "--index-type").replace("storage=", "--storage "))
    try:
        for uri in sinks:
            check_sink(uri)
        c = Corpus(corpus, fmt, id_field, title_field or None, text_field, metadata_fields, not no_store_text)
        m = load_model(model, device, dtype, backend, threads)
        # stores are opened (reachable, of the model's dimension) before hours of embedding, not after
        stores = {uri: open_store(uri, m, create=True) for uri in sinks if not uri.startswith("index:")}
        idx = build_index(c, out, m, part_size=part_size, batch_size=batch_size, index_options=options,
                          force=force, long=long_mode, chunk_overlap=chunk_overlap,
                          log=lambda msg: click.echo(msg, err=True))
        what = f"{len(idx.documents())} documents in {len(idx)} chunks" if idx.chunked else f"{len(idx)} documents"
        click.echo(f"indexed {what} ({idx.dim}-d, {kind}, {storage}) into {out}", err=True)
        for uri in sinks:
            if uri.startswith("index:"):
                idx.save(uri.removeprefix("index:"))
                click.echo(f"saved a copy of the index into {uri}", err=True)
            else:
                r = load_rows(stores[uri], idx.rows(), total=len(idx))
                click.echo(f"loaded {r['rows']} rows into {uri} ({r['rows_per_s']:,.0f} rows/s, index "
                           f"{r['index_seconds']:.1f} s)", err=True)
    except TooFewVectorsError as e:
        staged = Path(out) / STAGING
        kept = (f" The embedded vectors are kept in {staged}: rerun with other index options to use them without "
                "embedding again." if staged.is_dir() else "")
        raise click.ClickException(f"--index-type ivfpq needs at least {e.needed} vectors to train its quantisers; "
                                   f"the corpus gives {e.have}{' chunks' if long_mode == 'chunks' else ''}. Use "
                                   f"--index-type exact or hnsw for a corpus this small.{kept}")
    except (CorpusError, IndexFileError, StoreError, ValueError) as e:
        raise click.ClickException(str(e))


@click.command("search")
@click.argument("index_dir", type=click.Path(file_okay=False))
@click.argument("queries", nargs=-1, required=True)
@click.option("-k", "--top-k", "k", default=10, show_default=True, help="Results per query.")
@click.option("--task", default=None, help="Task name or instruction for instruct models.")
@click.option("--output-format", "--format", "output_format", type=click.Choice(["table", "jsonl"]), default="table",
              show_default=True)
@click.option("--ef-search", type=int, default=None, help="HNSW search breadth (recall vs speed).")
@click.option("--nprobe", type=int, default=None, help="IVF lists to visit (recall vs speed).")
@click.option("--aggregate", type=click.Choice(["max", "sum", "mean"]), default="max", show_default=True,
              help="Index of chunks: score a document by its best chunk (max) or the sum / mean of its best chunks.")
@click.option("--top-chunks", type=int, default=3, show_default=True, help="Chunks summed / averaged by --aggregate.")
@model_options(model_default=None,
               model_help="Registry name, hub id or local directory [default: the model the index was built with].")
def search(index_dir, queries, k, task, output_format, ef_search, nprobe, aggregate, top_chunks, model, device, dtype,
           backend, threads):
    """Search the index at INDEX_DIR for each of QUERIES (the model defaults to the index's own).

    \b
    e5kit search my-index "how much protein should a female eat" -k 5
    """
    from ..models import DEFAULT_MODEL
    from .core import Index
    from .storage import IndexMismatchError, read_manifest

    from ..stores import is_store_uri, open_store

    try:
        store = open_store(index_dir) if is_store_uri(index_dir) else None  # pgvector / LanceDB (e5kit.stores)
        manifest = store.info if store is not None else read_manifest(Path(index_dir))
        m = load_model(model or manifest.get("model") or DEFAULT_MODEL, device, dtype, backend, threads)
        if store is not None:
            options = {"ef_search": ef_search} | ({"nprobe": nprobe} if nprobe is not None else {})
            results = store.with_model(m).search(list(queries), k=k, task=task, **options)
        else:
            results = Index.load(index_dir, m).search(list(queries), k=k, task=task, ef_search=ef_search, nprobe=nprobe,
                                                      aggregate=aggregate, top_chunks=top_chunks)
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
            snippet = " ".join(str(x) for x in (meta.get("title"), h.highlight or meta.get("text")) if x)
            rows.append((str(rank), f"{h.score:.4f}", h.id, snippet.replace("\n", " ")))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for j, r in enumerate(rows):
            line = "  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  "
            line += r[3][: max(10, width - len(line) - 1)]
            click.echo(line.rstrip())
            if j == 0:
                click.echo("  ".join("-" * w for w in widths + [4]))
        click.echo("")
