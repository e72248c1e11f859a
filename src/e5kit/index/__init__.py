"""A vector index for E5 embeddings: add passages with ids and metadata, search, delete, save, load.

* ``core``: :class:`Index` (ids, metadata, deletes, search, save / load) and :class:`Hit`.
* ``scoring``: exact top-k scanned in bounded memory, int8 / binary scorers, float rescoring.
* ``faiss_backends``: the approximate kinds (HNSW, IVF-PQ) through FAISS.
* ``storage``: crash-safe files, the manifest, digests, and the fingerprint of models and corpora.
* ``build``: corpus files and the resumable ``e5kit index build``; ``cli``: the commands.
"""

from .core import KINDS, METRICS, STORAGES, Hit, Index
from .scoring import chunked_topk, quantization_ranges
from .storage import (MANIFEST, IndexFileError, IndexMismatchError, atomic_write, check_model, fingerprint,
                      model_fingerprint, read_manifest)

__all__ = ["Index", "Hit", "IndexFileError", "IndexMismatchError", "chunked_topk", "atomic_write", "KINDS",
           "STORAGES", "METRICS", "MANIFEST", "check_model", "fingerprint", "model_fingerprint",
           "quantization_ranges", "read_manifest"]
