"""API keys: Bearer tokens compared in constant time, labelled for metering, never logged."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path
from typing import Iterable


class KeyFileError(ValueError):
    """The key file is missing or malformed."""


def key_label(key: str) -> str:
    """A stable, non-secret name for a key: ``key-`` and 8 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def read_key_file(path: str | os.PathLike) -> dict[str, str]:
    """Keys from a file, one per line: ``KEY`` or ``LABEL KEY``; blank lines and ``#`` comments skipped.

    Returns label -> key. The label (for metrics and /v1/usage) defaults to :func:`key_label`.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read API key file {p}: {e}") from e
    out: dict[str, str] = {}
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise KeyFileError(f"{p}:{n}: expected 'KEY' or 'LABEL KEY', found {len(parts)} fields")
        label, key = (parts[0], parts[1]) if len(parts) == 2 else (key_label(parts[0]), parts[0])
        _add(out, label, key, f"{p}:{n}")
    return out


def _add(keys: dict[str, str], label: str, key: str, where: str) -> None:
    if not key.isascii() or not key.isprintable():
        raise KeyFileError(f"{where}: API keys must be printable ASCII")
    if label in keys and keys[label] != key:
        raise KeyFileError(f"{where}: label {label!r} is used for two different keys")
    keys[label] = key


class KeyStore:
    """The accepted keys. ``check`` returns the caller's label or None (no key / wrong key)."""

    def __init__(self, keys: dict[str, str] | None = None):
        self._keys = [(label, key.encode("utf-8")) for label, key in (keys or {}).items()]

    @classmethod
    def from_sources(cls, keys: Iterable[str] = (), key_file: str | os.PathLike | None = None) -> "KeyStore":
        merged: dict[str, str] = {}
        for k in keys:
            _add(merged, key_label(k), k, "--api-key")
        if key_file:
            for label, k in read_key_file(key_file).items():
                _add(merged, label, k, str(key_file))
        return cls(merged)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The label of the key in an ``Authorization: Bearer KEY`` header, else None."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        given = token.strip().encode("utf-8", "surrogateescape")
        found = None
        for label, key in self._keys:  # compare with every key so timing reveals nothing
            if hmac.compare_digest(given, key) and found is None:
                found = label
        return found
