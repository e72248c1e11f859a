"""Framework adapters: :class:`e5kit.integrations.langchain.E5Embeddings` (``pip install
e5kit[langchain]``) and :class:`e5kit.integrations.llamaindex.E5Embedding` (``e5kit[llamaindex]``).
Both embed queries and documents with the model's own conventions, through a local model or an
``e5kit serve`` server."""

from .backend import E5Backend

__all__ = ["E5Backend"]
