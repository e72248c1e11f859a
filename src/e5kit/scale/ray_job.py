"""``e5kit embed-corpus``: embed a corpus on Ray Data with a pool of e5kit engine actors.

The driver plans numbered input shards (:mod:`e5kit.scale.shards`), drops the ones already finished
by an earlier run, and streams the rest through ``map_batches`` onto a fixed pool of actors, each
holding one model. An actor embeds a whole shard and renames its parquet file into place, so a
shard is either complete or absent: a killed actor (Ray restarts it and retries the shard) or a
killed driver (rerun) never leaves a partial or duplicated shard. The driver then checks that every
id appears exactly once and writes ``manifest.json``, which the sinks read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np

from .shards import (MANIFEST, SHARD_DIR, CorpusInputError, Fields, ShardSpec, document, plan_shards, read_records,
                     shard_source, vectors_table, write_manifest, write_shard)

# A test hook: "N:MARKER" makes the actor that picks up shard N exit hard once (while MARKER is absent).
FAULT_ENV = "E5KIT_FAULT_EXIT_SHARD"
JOB_FILE = "job.json"


class ShardEmbedder:
    """A Ray Data actor: one model; each call embeds whole shards and writes their parquet files."""

    def __init__(self, out: str, job: str, model: str, fields: dict, device: str | None, dtype: str | None,
                 backend: str, threads: int | None, batch_size: int, max_batch_tokens: int, long: str = "truncate",
                 chunk_overlap: int = 64, fault: str | None = None):
        from ..api import E5

        self.model = E5(model, device=device, dtype=dtype, backend=backend, threads=threads)
        self.out, self.job, self.fields = out, job, Fields(**{**fields, "metadata_fields": tuple(fields["metadata_fields"])})
        self.batch_size, self.max_batch_tokens, self.fault = batch_size, max_batch_tokens, fault
        self.long, self.chunk_overlap = long, chunk_overlap

    def __call__(self, batch: dict) -> dict:
        from ..index.build import embed_documents

        res: dict[str, list] = {"shard": [], "docs": [], "rows": [], "tokens": [], "truncated": [], "seconds": []}
        for spec_json in batch["spec"]:
            t0 = time.perf_counter()
            spec = ShardSpec(**json.loads(spec_json))
            docs = [document(where, rec, self.fields) for where, rec in read_records(spec)]
            self._maybe_fail(spec.shard)
            if docs:
                r = embed_documents(self.model, docs, self.long, self.chunk_overlap, batch_size=self.batch_size,
                                    max_batch_tokens=self.max_batch_tokens)
                ids, vec, meta, ntok, ntr = r.ids, r.vectors, r.metadata, r.n_tokens, r.truncated
            else:
                ids, vec, meta, ntok, ntr = [], np.zeros((0, self.model.dim), np.float32), [], 0, 0
            table = vectors_table(ids, vec, [json.dumps(m or {}, ensure_ascii=False, default=str) for m in meta])
            write_shard(self.out, spec, self.job, table)
            for k, v in zip(res, (spec.shard, len(docs), len(ids), ntok, ntr, time.perf_counter() - t0)):
                res[k].append(v)
        return res

    def _maybe_fail(self, shard: int) -> None:
        if self.fault:
            n, marker = self.fault.split(":", 1)
            if int(n) == shard and not os.path.exists(marker):
                Path(marker).touch()
                os._exit(17)


def _model_ref(model: str) -> str:
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _job_state(model: str, fields: Fields, fmt: str | None, shard_mb: float, shard_rows: int,
               dtype: str | None, backend: str, long: str, chunk_overlap: int) -> dict:
    return {"model": model, "fields": asdict(fields) | {"metadata_fields": list(fields.metadata_fields)},
            "format": fmt or "auto", "shard_mb": shard_mb, "shard_rows": shard_rows, "dtype": dtype, "backend": backend,
            "long": long, "chunk_overlap": chunk_overlap if long != "truncate" else None}


def _write_json(fs, path: str, obj: dict) -> None:
    with fs.open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
    fs.mv(f"{path}.tmp", path)


def _user_error(e: BaseException) -> CorpusInputError | None:
    """The CorpusInputError an actor raised, found inside Ray's wrappers (or in their message)."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is CorpusInputError:
            return x
        todo += [getattr(x, "cause", None), x.__cause__, x.__context__]
    found = re.findall(r"CorpusInputError: (.+)", str(e))
    return CorpusInputError(found[-1].strip()) if found else None


def check_unique(fs, root: str, specs: list[ShardSpec]) -> int:
    """Total rows over all shards; raises CorpusInputError naming a duplicated id and where it occurs."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    cols, owner = [], []
    for s in specs:
        with fs.open(f"{root}/{SHARD_DIR}/{s.name}", "rb") as f:
            col = pq.read_table(f, columns=["id"]).column("id")
        cols.append(col)
        owner.append(np.full(len(col), s.shard, dtype=np.int64))
    ids = pa.chunked_array([c for col in cols for c in col.chunks], pa.string())
    counts = pc.value_counts(ids)
    dup = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(dup):
        first = dup[0]["values"].as_py()
        where = sorted({int(o) for o in np.concatenate(owner)[pc.equal(ids, first).to_numpy(zero_copy_only=False)]})
        files = sorted({specs[w].path for w in where})
        raise CorpusInputError(f"{len(dup)} id(s) appear more than once, e.g. {first!r} ({dup[0]['counts'].as_py()} "
                               f"times, in shards {where} of {files}); ids must be unique. Fix the input and rerun: "
                               f"shards of unchanged files are kept")
    return len(ids)


def embed_corpus(
    inputs: list[str] | tuple[str, ...],
    out: str,
    model: str,
    *,
    fields: Fields = Fields(),
    fmt: str | None = None,
    shard_mb: float = 8,
    shard_rows: int = 5_000,
    workers: int | None = None,
    cpus_per_worker: float = 1,
    gpus_per_worker: float = 0,
    threads: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    backend: str = "auto",
    batch_size: int = 32,
    max_batch_tokens: int = 16384,
    address: str | None = None,
    long: str = "truncate",
    chunk_overlap: int = 64,
    force: bool = False,
    log: Callable[[str], None] = lambda m: None,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Embed the passages of ``inputs`` into parquet shards under ``out``; returns the run's summary.

    ``long``: passages over the model's limit are truncated, or embedded whole as the "mean" of
    their chunks (one row per document), or as "chunks" (rows ``<id>#<n>`` whose metadata holds the
    document id and the chunk's span), as :func:`e5kit.index.build.embed_documents` does.
    Rerunning with the same inputs and settings resumes: finished shards are kept, the rest redone.
    """
    from ..chunking import LONG_MODES

    if long not in LONG_MODES:
        raise CorpusInputError(f"long must be one of {LONG_MODES}, not {long!r}")
    if chunk_overlap < 0:
        raise CorpusInputError(f"chunk_overlap must be >= 0, not {chunk_overlap}")
    model = _model_ref(model)
    specs = plan_shards(inputs, fmt, shard_mb, shard_rows)
    state = _job_state(model, fields, fmt, shard_mb, shard_rows, dtype, backend, long, chunk_overlap)
    job = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    job_path = f"{root}/{JOB_FILE}"
    if fs.exists(job_path):
        with fs.open(job_path, "r") as f:
            old = json.load(f)
        if old != state:
            if not force:
                raise CorpusInputError(f"{out} holds vectors of a run with other settings ({old}); use the same "
                                       f"model and options to resume, another --out, or --force to start over")
            fs.rm(f"{root}/{SHARD_DIR}", recursive=True)
            fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    if fs.exists(f"{root}/{MANIFEST}"):
        fs.rm(f"{root}/{MANIFEST}")  # rewritten once every shard is verified again
    _write_json(fs, job_path, state)

    planned = {s.name: s for s in specs}
    done: set[int] = set()
    for p in fs.ls(f"{root}/{SHARD_DIR}", detail=False):
        name = p.rsplit("/", 1)[-1]
        spec = planned.get(name)
        if spec is not None and shard_source(fs, p) == {"source": spec.to_dict(), "job": job}:
            done.add(spec.shard)
        else:  # a temp file of a killed writer, or a shard of a changed input file
            fs.rm(p)
    pending = [s for s in specs if s.shard not in done]
    log(f"{len(specs)} shards: {len(done)} already done, {len(pending)} to embed")

    t0 = time.perf_counter()
    docs = rows = tokens = truncated = 0
    if pending:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        res = ray.cluster_resources()
        if workers is None:
            workers = int(res.get("GPU", 0) // gpus_per_worker) if gpus_per_worker else int(res.get("CPU", 1) // cpus_per_worker)
        workers = max(1, min(workers, len(pending)))
        log(f"{workers} worker(s) x {cpus_per_worker} CPU" + (f", {gpus_per_worker} GPU" if gpus_per_worker else ""))
        ds = ray.data.from_items([{"spec": json.dumps(s.to_dict())} for s in pending], override_num_blocks=len(pending))
        ds = ds.map_batches(
            ShardEmbedder, batch_size=1, concurrency=workers, num_cpus=cpus_per_worker, num_gpus=gpus_per_worker or None,
            fn_constructor_kwargs=dict(out=out, job=job, model=model, fields=state["fields"], device=device, dtype=dtype,
                                       backend=backend, threads=threads or max(1, int(cpus_per_worker)),
                                       batch_size=batch_size, max_batch_tokens=max_batch_tokens, long=long,
                                       chunk_overlap=chunk_overlap, fault=os.environ.get(FAULT_ENV)))
        n = 0
        free = ray.available_resources().get("CPU", 0.0)
        err = None
        try:
            for r in ds.iter_rows():
                n += 1
                docs, rows = docs + int(r["docs"]), rows + int(r["rows"])
                tokens, truncated = tokens + int(r["tokens"]), truncated + int(r["truncated"])
                el = time.perf_counter() - t0
                log(f"shard {int(r['shard'])} done ({int(r['rows'])} rows); {n}/{len(pending)} shards, {rows} rows, "
                    f"{tokens / el:,.0f} tok/s, ETA {el / n * (len(pending) - n):,.0f} s")
                if on_shard is not None:
                    on_shard({k: int(v) if k != "seconds" else float(v) for k, v in r.items()})
        except Exception as e:
            found = _user_error(e)
            if found is None:
                raise
            err, found = CorpusInputError(str(found)), None  # a fresh error: it keeps nothing of the failed run alive
        if err is not None:
            # Ray Data releases a failed run's actors (and their CPUs) only once nothing refers to the
            # run any more. Raised from the except block, the error would keep the run alive through its
            # context, and the caller's next job could wait forever for those CPUs (on a 2-CPU cluster).
            del ds
            _await_cpus(ray, free, log)
            raise err
    seconds = time.perf_counter() - t0

    total = check_unique(fs, root, specs)
    manifest = write_manifest(out, model, _dim(fs, root, specs[0]), total,
                              [{"file": s.name, "source": s.to_dict()} for s in specs], fields=state["fields"], job=job,
                              long=long, chunk_overlap=state["chunk_overlap"])
    summary = {"rows": total, "shards": len(specs), "shards_embedded": len(pending), "docs_embedded": docs,
               "rows_embedded": rows, "long": long,
               "tokens": tokens, "truncated": truncated, "seconds": seconds,
               "tokens_per_s": tokens / seconds if pending and seconds > 0 else 0.0, "workers": workers or 0,
               "dim": manifest["dim"], "out": out}
    return summary


def _await_cpus(ray, free: float, log: Callable[[str], None], timeout: float = 10.0) -> None:
    """Wait (a little) until the cluster has ``free`` CPUs available again: the failed run's actors
    are gone, and a next run from the same driver gets its workers. A CLI run's driver exits
    instead, which ends its actors in any case."""
    import gc

    gc.collect()  # the failed run's objects sit in reference cycles (tracebacks and frames)
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) < free:
        if time.monotonic() > deadline:
            log(f"the failed run's workers still hold CPUs after {timeout:.0f} s; a next run from this process "
                "may wait for them (a new process does not)")
            return
        time.sleep(0.1)


def _dim(fs, root: str, spec: ShardSpec) -> int:
    import pyarrow.parquet as pq

    with fs.open(f"{root}/{SHARD_DIR}/{spec.name}", "rb") as f:
        return pq.read_schema(f).field("vector").type.list_size
