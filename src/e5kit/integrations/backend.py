"""What the framework adapters share: embed queries and documents, locally or through a server.

Locally the texts go to :meth:`E5.encode_queries` / :meth:`E5.encode_passages`; through a server
they are sent as text to ``/v1/embeddings`` with ``input_type`` ``query`` / ``passage`` (never as
token ids: a client's tokenizer is not the model's), so the server applies the same prefixes.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

Vectors = list[list[float]]


class E5Backend:
    """Queries and documents embedded the E5 way by a local model or an ``e5kit serve`` server.

    ``model``: an :class:`~e5kit.E5`, or a hub id / local directory to load (``model_kwargs`` go to
    ``E5``, e.g. ``device``); with ``base_url`` it is the served model id (None: the server's first).
    ``base_url``: the server, ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
    ``task``: the instruction (or MTEB task name) on queries for instruct models.
    ``batch_size``: texts per forward pass locally, per request through a server.
    """

    def __init__(self, model: Any = None, *, base_url: str | None = None, api_key: str | None = None,
                 task: str | None = None, batch_size: int = 64, timeout: float = 120.0, **model_kwargs):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.task, self.batch_size = task, batch_size
        self.base_url = base_url.rstrip("/").removesuffix("/v1") if base_url else None
        if self.base_url is not None:
            if model is not None and not isinstance(model, str):
                raise TypeError("with base_url, model is the served model id (a string)")
            if model_kwargs:
                raise TypeError(f"{sorted(model_kwargs)} apply to a local model, not to a server")
            self.model_id, self.model = model, None
            self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            self._timeout = timeout
        else:
            from ..api import E5

            self.model = model if isinstance(model, E5) else E5(model, **model_kwargs) if model else E5(**model_kwargs)
            self.model_id = self.model.name

    def queries(self, texts: Sequence[str]) -> Vectors:
        return self._embed(list(texts), "query")

    def documents(self, texts: Sequence[str]) -> Vectors:
        return self._embed(list(texts), "passage")

    async def aqueries(self, texts: Sequence[str]) -> Vectors:
        return await self._aembed(list(texts), "query")

    async def adocuments(self, texts: Sequence[str]) -> Vectors:
        return await self._aembed(list(texts), "passage")

    # ---- local --------------------------------------------------------------------------------

    def _local(self, texts: list[str], input_type: str) -> Vectors:
        if input_type == "query":
            v = self.model.encode_queries(texts, task=self.task, batch_size=self.batch_size)
        else:
            v = self.model.encode_passages(texts, batch_size=self.batch_size)
        return v.tolist()

    # ---- server -------------------------------------------------------------------------------

    def _body(self, texts: list[str], input_type: str) -> dict:
        body = {"input": texts, "input_type": input_type, "encoding_format": "float"}
        if self.model_id:
            body["model"] = self.model_id
        if self.task and input_type == "query":
            body["task"] = self.task
        return body

    def _read(self, resp) -> Vectors:
        if resp.status_code != 200:
            try:
                msg = resp.json()["error"]["message"]
            except Exception:
                msg = resp.text[:500]
            raise RuntimeError(f"{self.base_url}/v1/embeddings answered {resp.status_code}: {msg}")
        return [d["embedding"] for d in sorted(resp.json()["data"], key=lambda d: d["index"])]

    def _chunks(self, texts: list[str]):
        return [texts[i:i + self.batch_size] for i in range(0, len(texts), self.batch_size)]

    def _embed(self, texts: list[str], input_type: str) -> Vectors:
        if not texts:
            return []
        if self.model is not None:
            return self._local(texts, input_type)
        import httpx

        out: Vectors = []
        with httpx.Client(base_url=self.base_url, headers=self._headers, timeout=self._timeout) as client:
            for chunk in self._chunks(texts):
                out += self._read(client.post("/v1/embeddings", json=self._body(chunk, input_type)))
        return out

    async def _aembed(self, texts: list[str], input_type: str) -> Vectors:
        if not texts:
            return []
        if self.model is not None:
            return await asyncio.to_thread(self._local, texts, input_type)
        import httpx

        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=self._timeout) as client:
            resps = await asyncio.gather(*(client.post("/v1/embeddings", json=self._body(c, input_type))
                                           for c in self._chunks(texts)))
        return [v for r in resps for v in self._read(r)]


def require(module: str, extra: str) -> None:
    """An ImportError that says which extra to install, instead of a bare ModuleNotFoundError."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(f"this adapter needs {module.split('.')[0]}: pip install 'e5kit[{extra}]'")


__all__ = ["E5Backend", "require"]
