"""Deterministic input shards and the parquet vector shards they become.

A corpus (jsonl or parquet files: local paths, globs or fsspec URLs) is cut into numbered shards by
a rule that depends only on the file list and sizes: files in sorted order; a jsonl file into byte
ranges of ``shard_mb`` (a shard holds the lines that *start* inside its range), a parquet file into
row ranges of ``shard_rows``. So a rerun plans the same shards, and a finished shard (a parquet file
renamed into place only once complete, carrying its source range in its footer) is skipped.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


if TYPE_CHECKING:  # pragma: no cover
    from ..index.build import Document

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
FORMAT = "e5kit-vectors"
FORMAT_VERSION = 1
META_KEY = b"e5kit.shard"


class CorpusInputError(ValueError):
    """The corpus cannot be read as asked (files, format, fields, duplicate ids)."""


@dataclass(frozen=True)
class Fields:
    """Which record fields are the id, title, text, and kept metadata."""

    id_field: str | None = None  # None: "_id" when present, else "id"
    title_field: str | None = "title"
    text_field: str = "text"
    metadata_fields: tuple[str, ...] = ()
    store_text: bool = True


@dataclass(frozen=True)
class ShardSpec:
    """One input shard: ``path`` rows/bytes [start, end) of a file of ``size`` bytes (``version`` its mtime/etag)."""

    shard: int
    path: str
    fmt: str
    start: int
    end: int
    size: int
    version: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def name(self) -> str:
        return f"shard-{self.shard:06d}.parquet"


def file_format(path: str, fmt: str | None) -> str:
    if fmt and fmt != "auto":
        if fmt not in ("jsonl", "parquet"):
            raise CorpusInputError(f"unknown input format {fmt!r}; expected jsonl or parquet")
        return fmt
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise CorpusInputError(f"cannot tell the format of {path} from its name; pass --format jsonl or parquet")


def resolve_inputs(inputs: list[str] | tuple[str, ...]) -> list[tuple[fsspec.AbstractFileSystem, str]]:
    """(filesystem, path) of every input file, sorted and deduplicated; globs expanded, folders listed."""
    out: dict[str, fsspec.AbstractFileSystem] = {}
    for item in inputs:
        fs, root = fsspec.core.url_to_fs(item)
        if any(c in root for c in "*?["):
            paths = fs.glob(root)
        elif fs.isdir(root):
            paths = [p for p in fs.find(root) if not p.rsplit("/", 1)[-1].startswith((".", "_"))]
        elif fs.exists(root):
            paths = [root]
        else:
            raise CorpusInputError(f"{item} does not exist")
        if not paths:
            raise CorpusInputError(f"{item} matches no files")
        for p in paths:
            out[fs.unstrip_protocol(p)] = fs
    return [(out[u], u) for u in sorted(out)]


def plan_shards(inputs, fmt: str | None = None, shard_mb: float = 8, shard_rows: int = 5_000) -> list[ShardSpec]:
    """The numbered shards of the corpus (same files and sizes -> same shards)."""
    specs: list[ShardSpec] = []
    for fs, url in resolve_inputs(inputs):
        f = file_format(url, fmt)
        info = fs.info(url)
        size = int(info.get("size") or 0)
        version = str(info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("etag") or "")
        if f == "jsonl":
            if url.endswith(".gz"):
                raise CorpusInputError(f"{url}: compressed jsonl cannot be split into shards; decompress it first")
            step = max(1, int(shard_mb * (1 << 20)))
            ranges = [(s, min(s + step, size)) for s in range(0, size, step)]
        else:
            with fs.open(url, "rb") as fh:
                try:
                    rows = pq.ParquetFile(fh).metadata.num_rows
                except Exception as e:  # pyarrow raises several types for a bad file
                    raise CorpusInputError(f"{url} is not a readable parquet file ({e})") from e
            ranges = [(s, min(s + shard_rows, rows)) for s in range(0, rows, shard_rows)]
        specs += [ShardSpec(len(specs) + i, url, f, a, b, size, version) for i, (a, b) in enumerate(ranges)]
    if not specs:
        raise CorpusInputError(f"{list(inputs)} holds no data")
    return specs


def read_records(spec: ShardSpec) -> Iterator[tuple[str, dict]]:
    """(location, record) for every record of one shard, in file order."""
    fs, path = fsspec.core.url_to_fs(spec.path)
    if spec.fmt == "jsonl":
        with fs.open(path, "rb") as f:
            pos = spec.start
            if pos > 0:  # skip the line that started in the previous shard (a newline at start-1 ends it)
                f.seek(pos - 1)
                pos += len(f.readline()) - 1
            while pos < spec.end:
                line = f.readline()
                if not line:
                    break
                where, pos = f"{spec.path} at byte {pos}", pos + len(line)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise CorpusInputError(f"{where}: not valid JSON ({e})") from e
                if not isinstance(rec, dict):
                    raise CorpusInputError(f"{where}: expected a JSON object, got {type(rec).__name__}")
                yield where, rec
    else:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            row = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if row + n > spec.start and row < spec.end:
                    recs = pf.read_row_group(g).to_pylist()
                    for i in range(max(spec.start - row, 0), min(spec.end - row, n)):
                        yield f"{spec.path} row {row + i + 1}", recs[i]
                row += n


def document(where: str, rec: dict, fields: Fields) -> "Document":
    """One record as an :class:`e5kit.index.build.Document` (id, title, text, metadata); a missing
    id or text raises CorpusInputError naming ``where``."""
    from ..index.build import read_document

    return read_document(where, rec, id_field=fields.id_field, title_field=fields.title_field,
                         text_field=fields.text_field, metadata_fields=tuple(fields.metadata_fields),
                         store_text=fields.store_text, error=CorpusInputError)


def vectors_table(ids: list[str], vectors: np.ndarray, metadata: list[str]) -> pa.Table:
    """The parquet vector schema: id (string), vector (fixed-size float32 list), metadata (JSON string)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    return pa.table({"id": pa.array(ids, pa.string()), "vector": vec, "metadata": pa.array(metadata, pa.string())})


def write_shard(out: str, spec: ShardSpec, job: str, table: pa.Table) -> str:
    """Write a finished shard under a temporary name, then rename it into place (all or nothing)."""
    fs, root = fsspec.core.url_to_fs(out)
    final = f"{root}/{SHARD_DIR}/{spec.name}"
    tmp = f"{root}/{SHARD_DIR}/.{spec.name}.{uuid.uuid4().hex}.tmp"
    meta = {META_KEY: json.dumps({"source": spec.to_dict(), "job": job}).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd")
    fs.mv(tmp, final)
    return final


def shard_source(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The (source, job) a finished shard file was written for, or None when unreadable."""
    try:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f).metadata or {}
        return json.loads(md[META_KEY])
    except Exception:  # noqa: BLE001 - an unreadable shard is simply redone
        return None


def write_manifest(out: str, model: str, dim: int, rows: int, shards: list[dict], **extra) -> dict:
    """``manifest.json``: written last, once every shard is in place, so readers only see finished outputs."""
    fs, root = fsspec.core.url_to_fs(out)
    m = {"format": FORMAT, "version": FORMAT_VERSION, "model": model, "dim": dim, "rows": rows, **extra,
         "shards": shards}
    tmp = f"{root}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "w") as f:
        json.dump(m, f, indent=2)
    fs.mv(tmp, f"{root}/{MANIFEST}")
    return m


def write_vectors(out: str, model: str, ids: list[str], vectors: np.ndarray, metadata: list[dict | None]) -> dict:
    """Vectors embedded in one process (e.g. by ``e5kit index build``) in the embed-corpus output format."""
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(f"{root}/{SHARD_DIR}", exist_ok=True)
    spec = ShardSpec(0, "(in-process)", "vectors", 0, len(ids), 0, "")
    meta = [json.dumps(m, ensure_ascii=False, default=str) if m is not None else None for m in metadata]
    write_shard(out, spec, "in-process", vectors_table(list(ids), vectors, meta))
    return write_manifest(out, model, int(np.shape(vectors)[1]), len(ids), [{"file": spec.name, "source": spec.to_dict()}])


def read_manifest(vectors_dir: str) -> dict:
    """The manifest of a finished ``embed-corpus`` output (refuses an unfinished one)."""
    fs, root = fsspec.core.url_to_fs(vectors_dir)
    path = f"{root}/{MANIFEST}"
    if not fs.exists(path):
        raise CorpusInputError(f"{vectors_dir} holds no {MANIFEST}: not an e5kit embed-corpus output, or the run "
                               f"has not finished (rerun it to complete)")
    with fs.open(path, "r") as f:
        try:
            m = json.load(f)
        except ValueError:
            m = {}
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        raise CorpusInputError(f"{path} is not an e5kit vectors manifest (format version {FORMAT_VERSION})")
    return m


def iter_vectors(vectors_dir: str, batch_rows: int = 8192) -> Iterator[tuple[list[str], np.ndarray, list[dict]]]:
    """(ids, vectors, metadata) batches of a finished ``embed-corpus`` output, shard by shard."""
    m = read_manifest(vectors_dir)
    fs, root = fsspec.core.url_to_fs(vectors_dir)
    for s in m["shards"]:
        with fs.open(f"{root}/{SHARD_DIR}/{s['file']}", "rb") as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                vec = b.column("vector")
                arr = vec.flatten().to_numpy(zero_copy_only=False).reshape(len(b), vec.type.list_size)
                yield (b.column("id").to_pylist(), arr.astype(np.float32, copy=False),
                       [json.loads(x) if x else None for x in b.column("metadata").to_pylist()])
