"""A LangChain ``Embeddings`` for E5: ``embed_documents`` gets ``passage: ``, ``embed_query``
``query: `` (or the instruct template with ``task``), locally or through ``e5kit serve``.

>>> from e5kit.integrations.langchain import E5Embeddings
>>> emb = E5Embeddings("intfloat/e5-small-v2")                          # in-process
>>> emb = E5Embeddings(base_url="http://127.0.0.1:8000", model="small")  # an e5kit server

(LangChain's ``OpenAIEmbeddings`` pointed at the server sends tiktoken ids by default, which no E5
vocabulary shares, and cannot say query from document: use this class instead.)
"""

from __future__ import annotations

from typing import Any

from .backend import E5Backend, require

require("langchain_core", "langchain")
from langchain_core.embeddings import Embeddings  # noqa: E402


class E5Embeddings(Embeddings):
    """LangChain embeddings with E5's prefixes; arguments as :class:`~e5kit.integrations.E5Backend`."""

    def __init__(self, model: Any = None, *, base_url: str | None = None, api_key: str | None = None,
                 task: str | None = None, batch_size: int = 64, **model_kwargs):
        self.backend = E5Backend(model, base_url=base_url, api_key=api_key, task=task, batch_size=batch_size,
                                 **model_kwargs)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.backend.documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.backend.queries([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self.backend.adocuments(texts)

    async def aembed_query(self, text: str) -> list[float]:
        return (await self.backend.aqueries([text]))[0]


__all__ = ["E5Embeddings"]
