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
from typing import TYPE_CHECKING, Callable

import fsspec
import numpy as np

from .shards import (MANIFEST, SHARD_DIR, CorpusInputError, Fields, ShardSpec, document, plan_shards, read_records,
                     shard_source, vectors_table, write_manifest, write_shard)

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5

# A test hook: "N:MARKER" makes the actor that picks up shard N exit hard once (while MARKER is absent).
FAULT_ENV = "E5KIT_FAULT_EXIT_SHARD"
JOB_FILE = "job.json"


def embed_passages(model: "E5", texts: list[str], batch_size: int = 32,
                   max_batch_tokens: int = 16384) -> tuple[np.ndarray, int, int]:
    """(vectors exactly as ``model.encode_passages(texts)`` gives them, tokens embedded, texts truncated)."""
    from ..pipeline import finish

    prepared = model.prepare(texts, "passage")
    vec = finish(model.embed(prepared, batch_size=batch_size, max_batch_tokens=max_batch_tokens))
    return vec, prepared.n_tokens, len(prepared.truncated)


class ShardEmbedder:
    """A Ray Data actor: one model; each call embeds whole shards and writes their parquet files."""

    def __init__(self, out: str, job: str, model: str, fields: dict, device: str | None, dtype: str | None,
                 backend: str, threads: int | None, batch_size: int, max_batch_tokens: int, fault: str | None = None):
        from ..api import E5

        self.model = E5(model, device=device, dtype=dtype, backend=backend, threads=threads)
        self.out, self.job, self.fields = out, job, Fields(**{**fields, "metadata_fields": tuple(fields["metadata_fields"])})
        self.batch_size, self.max_batch_tokens, self.fault = batch_size, max_batch_tokens, fault

    def __call__(self, batch: dict) -> dict:
        res: dict[str, list] = {"shard": [], "rows": [], "tokens": [], "truncated": [], "seconds": []}
        for spec_json in batch["spec"]:
            t0 = time.perf_counter()
            spec = ShardSpec(**json.loads(spec_json))
            docs = [document(where, rec, self.fields) for where, rec in read_records(spec)]
            self._maybe_fail(spec.shard)
            ids = [d[0] for d in docs]
            if docs:
                vec, ntok, ntr = embed_passages(self.model, [d[1] for d in docs], self.batch_size, self.max_batch_tokens)
            else:
                vec, ntok, ntr = np.zeros((0, self.model.dim), np.float32), 0, 0
            write_shard(self.out, spec, self.job, vectors_table(ids, vec, [d[2] for d in docs]))
            for k, v in zip(res, (spec.shard, len(ids), ntok, ntr, time.perf_counter() - t0)):
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
               dtype: str | None, backend: str) -> dict:
    return {"model": model, "fields": asdict(fields) | {"metadata_fields": list(fields.metadata_fields)},
            "format": fmt or "auto", "shard_mb": shard_mb, "shard_rows": shard_rows, "dtype": dtype, "backend": backend}


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
    force: bool = False,
    log: Callable[[str], None] = lambda m: None,
    on_shard: Callable[[dict], None] | None = None,
) -> dict:
    """Embed the passages of ``inputs`` into parquet shards under ``out``; returns the run's summary.

    Rerunning with the same inputs and settings resumes: finished shards are kept, the rest redone.
    """
    model = _model_ref(model)
    specs = plan_shards(inputs, fmt, shard_mb, shard_rows)
    state = _job_state(model, fields, fmt, shard_mb, shard_rows, dtype, backend)
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
    rows = tokens = truncated = 0
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
                                       batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                       fault=os.environ.get(FAULT_ENV)))
        n = 0
        try:
            for r in ds.iter_rows():
                n += 1
                rows, tokens, truncated = rows + int(r["rows"]), tokens + int(r["tokens"]), truncated + int(r["truncated"])
                el = time.perf_counter() - t0
                log(f"shard {int(r['shard'])} done ({int(r['rows'])} rows); {n}/{len(pending)} shards, {rows} rows, "
                    f"{tokens / el:,.0f} tok/s, ETA {el / n * (len(pending) - n):,.0f} s")
                if on_shard is not None:
                    on_shard({k: int(v) if k != "seconds" else float(v) for k, v in r.items()})
        except Exception as e:
            err = _user_error(e)
            if err is not None:
                raise err from None
            raise
    seconds = time.perf_counter() - t0

    total = check_unique(fs, root, specs)
    manifest = write_manifest(out, model, _dim(fs, root, specs[0]), total,
                              [{"file": s.name, "source": s.to_dict()} for s in specs], fields=state["fields"], job=job)
    summary = {"rows": total, "shards": len(specs), "shards_embedded": len(pending), "rows_embedded": rows,
               "tokens": tokens, "truncated": truncated, "seconds": seconds,
               "tokens_per_s": tokens / seconds if pending and seconds > 0 else 0.0, "workers": workers or 0,
               "dim": manifest["dim"], "out": out}
    return summary


def _dim(fs, root: str, spec: ShardSpec) -> int:
    import pyarrow.parquet as pq

    with fs.open(f"{root}/{SHARD_DIR}/{spec.name}", "rb") as f:
        return pq.read_schema(f).field("vector").type.list_size
