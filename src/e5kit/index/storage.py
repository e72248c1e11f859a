"""Index files: crash-safe writes, the manifest, digests, and the identity of models and corpora.

Saving is crash-safe: every file is written under a new generation name, fsync'ed and renamed, and
the manifest (``index.json``) is replaced last, atomically; a crash at any point leaves the previous
complete index readable. Loading checks file sizes and SHA-256 digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..api import E5

FORMAT = "e5kit-index"
FORMAT_VERSION = 1
MANIFEST = "index.json"
GENERATION_KINDS = ("vectors", "deleted", "docs", "codes", "ranges", "faiss")


class IndexFileError(ValueError):
    """An index directory is missing, truncated, corrupt or of an unknown format."""


class IndexMismatchError(ValueError):
    """An index was built with a different model or embedding dimension than the one given."""


# ---- writing ------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` via ``write(fileobj)`` into a temp file, fsync it, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class GenerationWriter:
    """Writes one generation of an index's files into ``path``, then its manifest, then prunes.

    Use it as a context manager: if anything fails before :meth:`commit`, the files of this
    generation are removed again and the previous index stays as it was.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.gen = uuid.uuid4().hex[:12]
        self.files: dict[str, dict] = {}
        self.committed = False

    def __enter__(self) -> "GenerationWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.committed:
            for entry in self.files.values():
                (self.path / entry["name"]).unlink(missing_ok=True)

    def put(self, kind: str, suffix: str, write: Callable) -> None:
        name = f"{kind}-{self.gen}.{suffix}"
        f = self.path / name
        atomic_write(f, write)
        self.files[kind] = {"name": name, "bytes": f.stat().st_size, "sha256": sha256(f)}

    def put_array(self, kind: str, array: np.ndarray) -> None:
        self.put(kind, "npy", lambda f: np.save(f, array))

    def commit(self, manifest: dict) -> None:
        """Replace the manifest atomically, then delete earlier generations and stale temp files."""
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "generation": self.gen, **manifest,
                    "files": self.files}
        atomic_write(self.path / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode("utf-8")))
        self.committed = True
        keep = {f["name"] for f in self.files.values()} | {MANIFEST}
        for old in self.path.iterdir():
            if old.name not in keep and (old.name.endswith(".tmp") or is_generation_file(old.name)):
                old.unlink(missing_ok=True)


def is_generation_file(name: str) -> bool:
    stem = name.split(".")[0]
    kind, _, gen = stem.rpartition("-")
    return kind in GENERATION_KINDS and len(gen) == 12


# ---- reading ------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The manifest of the index at ``path``, checked for format and required fields."""
    f = Path(path) / MANIFEST
    if not Path(path).is_dir():
        raise IndexFileError(f"{path} is not a directory holding an e5kit index")
    if not f.exists():
        raise IndexFileError(f"{f} is missing: {path} is not an e5kit index (or its save never completed)")
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexFileError(f"{f} is corrupt ({e}); restore the index from a backup or rebuild it") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise IndexFileError(f"{f} is not an e5kit index manifest")
    if m.get("version") != FORMAT_VERSION:
        raise IndexFileError(f"{f} has format version {m.get('version')}; this e5kit reads version {FORMAT_VERSION}")
    missing = [k for k in ("dim", "count", "backend", "storage", "metric", "params", "files") if k not in m]
    if missing or not {"vectors", "deleted", "docs"} <= set(m.get("files", {})):
        raise IndexFileError(f"{f} lacks {missing or 'file entries'}; the manifest is corrupt")
    return m


class GenerationReader:
    """Reads the files a manifest lists, checking sizes (and digests when ``verify``)."""

    def __init__(self, path: Path, manifest: dict, verify: bool = True):
        self.path, self.files, self.verify = Path(path), manifest["files"], verify

    def __contains__(self, kind: str) -> bool:
        return kind in self.files

    def file(self, kind: str) -> Path:
        entry = self.files[kind]
        f = self.path / entry["name"]
        if not f.exists():
            raise IndexFileError(f"{f} is missing; the index at {self.path} is incomplete")
        if f.stat().st_size != entry["bytes"]:
            raise IndexFileError(f"{f} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                                 f"the file is truncated or was overwritten")
        if self.verify and sha256(f) != entry["sha256"]:
            raise IndexFileError(f"{f} does not match its SHA-256 digest in {MANIFEST}: the file is corrupt")
        return f

    def array(self, kind: str, mmap_mode: str | None = None) -> np.ndarray:
        f = self.file(kind)
        try:
            return np.load(f, mmap_mode=mmap_mode, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexFileError(f"{f} is not a readable .npy array ({e})") from e

    def jsonl(self, kind: str) -> list:
        f = self.file(kind)
        try:
            with open(f, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh]
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexFileError(f"{f} is corrupt ({e})") from e


# ---- identity -----------------------------------------------------------------------------------


def fingerprint(files: Iterable[Path]) -> str | None:
    """A cheap identity of some files: each one's name and size, and the first and last MiB of it.

    Used for models (their config and weights: two copies of one checkpoint in different folders
    match, a fine-tune of the same base does not) and for corpora (to resume only the same file).
    None when none of the files exists.
    """
    h = hashlib.sha256()
    found = False
    for f in map(Path, files):
        if not f.is_file():
            continue
        found = True
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:32] if found else None


def model_fingerprint(model: "E5") -> str | None:
    """The :func:`fingerprint` of a model's checkpoint (config and weights files)."""
    path = Path(model.engine.checkpoint.path)
    return fingerprint(path / name for name in ("config.json", "model.safetensors", "pytorch_model.bin"))


def check_model(manifest: dict, model: "E5", path: Path | str = "") -> None:
    """Raise :class:`IndexMismatchError` unless ``model`` is the model the index was built with."""
    where = f"the index at {path}" if path else "this index"
    if model.dim != manifest["dim"]:
        raise IndexMismatchError(f"{where} holds {manifest['dim']}-d vectors from {manifest.get('model')}, "
                                 f"but {model.name} embeds in {model.dim} dimensions; use the same model")
    built_fp, fp = manifest.get("model_fingerprint"), model_fingerprint(model)
    same = (built_fp == fp) if (built_fp and fp) else (manifest.get("model") in (None, model.name))
    if not same:
        raise IndexMismatchError(f"{where} was built with model {manifest.get('model')!r}, not {model.name!r} "
                                 f"(different weights): queries would not match its vectors. Load it with "
                                 f"the model it was built with, or rebuild the index")
