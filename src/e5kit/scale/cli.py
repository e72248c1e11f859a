"""``e5kit embed-corpus`` (Ray Data) and ``e5kit load-vectors`` (parquet vectors -> stores)."""

from __future__ import annotations

import json
import os

import click

from ..cli import load_model, model_options


def load_into(vectors_dir: str, uri: str, *, batch_rows: int = 8192, device=None, dtype=None, backend="auto",
              threads=None) -> dict:
    """Load a finished embed-corpus output into the store at ``uri`` (``index:DIR`` writes an e5kit Index)."""
    from ..scale.shards import iter_vectors, read_manifest
    from ..stores import check_sink, load_vectors

    check_sink(uri)
    m = read_manifest(vectors_dir)
    if uri.startswith("index:"):
        import time

        from ..index import Index

        t0 = time.perf_counter()  # rows of chunks (--long chunks) make an index of chunks, which ranks documents
        idx = Index(load_model(m["model"], device, dtype, backend, threads), chunked=m.get("long") == "chunks")
        for ids, vec, meta in iter_vectors(vectors_dir, batch_rows):
            idx.add(ids, embeddings=vec, metadata=meta)
        idx.save(uri.removeprefix("index:"))
        dt = time.perf_counter() - t0
        return {"rows": len(idx), "write_seconds": dt, "rows_per_s": len(idx) / dt, "index_seconds": 0.0}
    from ..stores import open_store

    store = open_store(uri, dim=m["dim"], create=True, model_name=m["model"])
    return load_vectors(vectors_dir, store, batch_rows=batch_rows)


@click.command("embed-corpus")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", required=True, help="Output folder (or fsspec URL) for the parquet vector shards.")
@click.option("--format", "fmt", type=click.Choice(["auto", "jsonl", "parquet"]), default="auto", show_default=True)
@click.option("--id-field", default=None, help="Field holding the document id [default: _id if present, else id].")
@click.option("--title-field", default="title", show_default=True, help="Field holding the title ('' for none).")
@click.option("--text-field", default="text", show_default=True)
@click.option("--metadata-field", "metadata_fields", multiple=True, help="Extra field to keep as metadata (repeatable).")
@click.option("--no-store-text", is_flag=True, help="Do not keep title/text in the metadata.")
@click.option("--shard-mb", default=8.0, show_default=True, help="jsonl: input megabytes per resumable shard.")
@click.option("--shard-rows", default=5_000, show_default=True, help="parquet: rows per resumable shard.")
@click.option("--workers", type=int, default=None, help="Engine actors [default: cluster CPUs / --cpus-per-worker, "
              "or GPUs / --gpus-per-worker].")
@click.option("--cpus-per-worker", default=1.0, show_default=True, help="CPUs reserved per actor (its torch threads).")
@click.option("--gpus-per-worker", default=0.0, show_default=True, help="GPUs per actor (1 = one GPU each).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local cluster).")
@click.option("--long", "long_mode", type=click.Choice(["truncate", "chunks", "mean"]), default="truncate",
              show_default=True, help="Passages over the model's limit: truncate them, embed the mean of their chunks "
              "(one row per document), or one row per chunk (id <id>#<n>, document id and span in the metadata).")
@click.option("--chunk-overlap", type=int, default=64, show_default=True, help="With --long chunks/mean: tokens shared "
              "by neighbouring chunks.")
@click.option("--sink", "sinks", multiple=True, help="After embedding, load into this store (repeatable): "
              "postgresql://...?table=T, lancedb:DIR?table=T, or index:DIR.")
@click.option("--force", is_flag=True, help="Discard the vectors of an earlier run with other settings.")
@model_options
def embed_corpus(inputs, out, fmt, id_field, title_field, text_field, metadata_fields, no_store_text, shard_mb,
                 shard_rows, workers, cpus_per_worker, gpus_per_worker, batch_size, address, long_mode, chunk_overlap,
                 sinks, force, model, device, dtype, backend, threads):
    """Embed the passages of INPUTS (jsonl/parquet files, globs, folders or fsspec URLs) on Ray into --out.

    Rerun the same command to resume after a crash: finished shards are kept.

    \b
    e5kit embed-corpus corpus.jsonl --out vecs -m intfloat/e5-small-v2
    e5kit embed-corpus 's3://bucket/docs/*.parquet' --out /shared/vecs --address auto --gpus-per-worker 1
    e5kit embed-corpus corpus.jsonl --out vecs --sink 'postgresql://localhost/db?table=docs' --sink lancedb:./ldb
    """
    try:
        import ray  # noqa: F401
    except ImportError as e:
        raise click.ClickException(f"embed-corpus runs on Ray: pip install 'e5kit[ray]' ({e})")
    from ..stores import StoreError, check_sink
    from .ray_job import embed_corpus as run
    from .shards import CorpusInputError, Fields

    if gpus_per_worker and device is None:
        device = "cuda"
    try:
        for uri in sinks:
            check_sink(uri)
        s = run(list(inputs), out, model, fields=Fields(id_field, title_field or None, text_field,
                                                       tuple(metadata_fields), not no_store_text),
                fmt=fmt, shard_mb=shard_mb, shard_rows=shard_rows, workers=workers, cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker, threads=threads, device=device, dtype=dtype, backend=backend,
                batch_size=batch_size, address=address or os.environ.get("RAY_ADDRESS"), long=long_mode,
                chunk_overlap=chunk_overlap, force=force,
                log=lambda m: click.echo(m, err=True))
        click.echo(f"embedded {s['docs_embedded']} documents as {s['rows_embedded']} rows in {s['shards_embedded']} "
                   f"shards ({s['tokens']:,} tokens, {s['tokens_per_s']:,.0f} tok/s, {s['seconds']:.1f} s, "
                   f"{s['workers']} workers); {out} holds {s['rows']} rows in {s['shards']} shards, {s['dim']}-d"
                   + (f"; {s['truncated']} passages truncated" if s["truncated"] else ""), err=True)
        for uri in sinks:
            r = load_into(out, uri, device=device, dtype=dtype, backend=backend, threads=threads)
            click.echo(f"loaded {r['rows']} rows into {uri} ({r['rows_per_s']:,.0f} rows/s)", err=True)
    except (CorpusInputError, StoreError) as e:
        raise click.ClickException(str(e))
    click.echo(json.dumps(s))


@click.command("load-vectors")
@click.argument("vectors_dir")
@click.option("--into", "sinks", multiple=True, required=True, help="Store to load (repeatable): "
              "postgresql://...?table=T, lancedb:DIR?table=T, or index:DIR.")
@click.option("--batch-rows", default=8192, show_default=True, help="Rows per upsert transaction.")
def load_vectors(vectors_dir, sinks, batch_rows):
    """Load the parquet vectors of a finished `e5kit embed-corpus` run into one or more stores (idempotent).

    \b
    e5kit load-vectors vecs --into 'postgresql://localhost/db?table=docs' --into lancedb:./ldb?table=docs
    """
    from ..stores import StoreError
    from .shards import CorpusInputError

    for uri in sinks:
        try:
            r = load_into(vectors_dir, uri, batch_rows=batch_rows)
        except (CorpusInputError, StoreError) as e:
            raise click.ClickException(str(e))
        click.echo(f"loaded {r['rows']} rows into {uri} ({r['rows_per_s']:,.0f} rows/s, index "
                   f"{r['index_seconds']:.1f} s)", err=True)
