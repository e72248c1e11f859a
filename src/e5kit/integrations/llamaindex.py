"""A LlamaIndex embedding for E5: text (node) embeddings get ``passage: ``, query embeddings
``query: `` (or the instruct template with ``task``), locally or through ``e5kit serve``.

>>> from e5kit.integrations.llamaindex import E5Embedding
>>> Settings.embed_model = E5Embedding("intfloat/multilingual-e5-small")
>>> Settings.embed_model = E5Embedding(base_url="http://127.0.0.1:8000", model="small")
"""

from __future__ import annotations

from typing import Any

from .backend import E5Backend, require

require("llama_index.core", "llamaindex")
from llama_index.core.base.embeddings.base import BaseEmbedding  # noqa: E402
from llama_index.core.bridge.pydantic import PrivateAttr  # noqa: E402


class E5Embedding(BaseEmbedding):
    """LlamaIndex embeddings with E5's prefixes; arguments as :class:`~e5kit.integrations.E5Backend`
    (``embed_batch_size`` is LlamaIndex's batch, also used per forward pass / request)."""

    _backend: E5Backend = PrivateAttr()

    def __init__(self, model: Any = None, *, base_url: str | None = None, api_key: str | None = None,
                 task: str | None = None, embed_batch_size: int = 64, **model_kwargs):
        backend = E5Backend(model, base_url=base_url, api_key=api_key, task=task, batch_size=embed_batch_size,
                            **model_kwargs)
        super().__init__(model_name=str(backend.model_id or "default"), embed_batch_size=embed_batch_size)
        self._backend = backend

    @classmethod
    def class_name(cls) -> str:
        return "E5Embedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._backend.queries([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._backend.documents([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._backend.documents(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return (await self._backend.aqueries([query]))[0]

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return (await self._backend.adocuments([text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return await self._backend.adocuments(texts)


__all__ = ["E5Embedding"]
