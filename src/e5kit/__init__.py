"""e5kit: the E5 text-embedding family end to end."""

from .api import E5, TruncationWarning, quantize_embeddings
from .engine import InputTooLongError
from .index import Hit, Index, IndexFileError, IndexMismatchError
from .loading import E5LoadError
from .models import DEFAULT_MODEL, REGISTRY, ModelSpec
from .pipeline import Prepared

__version__ = "0.1.0"
__all__ = ["E5", "E5LoadError", "Index", "Hit", "IndexFileError", "IndexMismatchError", "InputTooLongError",
           "TruncationWarning", "quantize_embeddings", "Prepared", "REGISTRY", "ModelSpec", "DEFAULT_MODEL", "__version__"]
