"""Dynamic batching: many concurrent clients get exactly what a lone request gets (tiny models
in-process, the real model behind a real `e5kit serve` process)."""

from __future__ import annotations

import asyncio
import random

import httpx
import numpy as np

from server_helpers import metric

WORDS = ("the protein female eat summit define cdc guideline average requirement women grams day marathon "
         "mountain cell gene cancer study patients risk").split()


def pool(n: int, seed: int = 0, long_every: int = 9) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = 700 if i % long_every == 0 else rng.randint(1, 60)  # some inputs are cut at 512 tokens
        out.append(" ".join(rng.choice(WORDS) for _ in range(k)))
    return out


def _client(server, **kw) -> httpx.AsyncClient:
    if hasattr(server, "async_client"):
        return server.async_client(headers=server.headers, **kw)
    return httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120, **kw)


def _run(server, coro):
    return server.run(coro) if hasattr(server, "run") else asyncio.run(coro)


def _get(server, path: str) -> str:
    c = server.client if hasattr(server, "client") else httpx
    return c.get(path if hasattr(server, "client") else server.url + path, headers=server.headers).text


async def _singles(server, model, texts):
    async with _client(server) as c:
        out = []
        for t in texts:
            r = await c.post("/v1/embeddings", json={"model": model, "input": t})
            assert r.status_code == 200, r.text
            j = r.json()
            out.append((np.array(j["data"][0]["embedding"], np.float32), j["usage"]["prompt_tokens"]))
        return out


async def _concurrent(server, model, texts, clients: int, per_client: int, seed: int):
    rng = random.Random(seed)
    plans = [[rng.sample(range(len(texts)), rng.randint(1, 3)) for _ in range(per_client)] for _ in range(clients)]

    async def one_client(plan):
        async with _client(server) as c:
            res = []
            for idx in plan:
                r = await c.post("/v1/embeddings", json={"model": model, "input": [texts[i] for i in idx]})
                res.append((idx, r.status_code, r.json()))
            return res

    results = await asyncio.gather(*(one_client(p) for p in plans))
    return [x for r in results for x in r]


def check_concurrency(server, model, texts, clients=50, per_client=4):
    singles = _run(server, _singles(server, model, texts))
    before = _get(server, "/metrics")
    got = _run(server, _concurrent(server, model, texts, clients, per_client, seed=1))
    assert len(got) == clients * per_client
    for idx, status, body in got:
        assert status == 200, body
        vecs = np.array([d["embedding"] for d in body["data"]], np.float32)
        np.testing.assert_allclose(vecs, np.stack([singles[i][0] for i in idx]), atol=1e-5, rtol=0)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] == sum(singles[i][1] for i in idx)
    after = _get(server, "/metrics")
    batches = metric(after, "e5kit_batch_size_count", model=model) - metric(before, "e5kit_batch_size_count", model=model)
    inputs = metric(after, "e5kit_batch_size_sum", model=model) - metric(before, "e5kit_batch_size_sum", model=model)
    n_inputs = sum(len(idx) for idx, _, _ in got)
    assert inputs == n_inputs  # every input went through the model exactly once
    assert batches < n_inputs  # ... and requests from different clients shared forward passes
    tokens = sum(b["usage"]["total_tokens"] for _, _, b in got)
    assert metric(after, "e5kit_model_tokens_total", model=model) - metric(before, "e5kit_model_tokens_total",
                                                                            model=model) == tokens


def test_200_concurrent_requests_tiny(tiny_server):
    check_concurrency(tiny_server, "tiny", pool(40))


def test_200_concurrent_requests_real_model(ml_server):
    texts = ["how much protein should a female eat", "南瓜的家常做法", "summit define", "Wie viel Protein?",
             "the highest point of a mountain", "cancer risk in patients", "a", "marathon training plan"]
    check_concurrency(ml_server, "ml", texts)
