"""Admission by expected wait, backpressure, disconnects and the token cap, in-process with the real
model. Most tests hold the worker with an event (deterministic); the burst is real."""

from __future__ import annotations

import asyncio
import copy
import threading
import time

import numpy as np
import openai
import pytest

from e5kit import E5
from e5kit.server import ServerConfig, create_app
from e5kit.server.batcher import _Throughput
from inprocess import InProcessServer
from server_helpers import metric

LONG = " ".join(["the cell study of gene and cancer risk in patients"] * 80)  # > 512 tokens
BIG = [f"{i} {LONG}" for i in range(6)]  # 6 x 512 tokens


@pytest.fixture(scope="module")
def ml_app(ml_e5):
    model = E5(str(ml_e5))
    server = InProcessServer(create_app([("ml", model)], ServerConfig(max_queued_tokens=6000,
                                                                      max_batch_tokens=4096)))
    yield server
    server.stop()


@pytest.fixture
def gate(ml_app, monkeypatch):
    """Hold the worker inside its next forward pass until released (the measured rate, which would count
    the held time as forward time, is restored afterwards; earlier refusals' promises are cleared)."""
    batcher = ml_app.service.served["ml"].batcher
    monkeypatch.setattr(batcher, "_rate", copy.deepcopy(batcher._rate))
    monkeypatch.setattr(batcher, "_horizon", 0.0)  # no Retry-After promises left from earlier tests
    engine = ml_app.service.served["ml"].model.engine
    entered, release = threading.Event(), threading.Event()
    real = engine.forward

    def gated(seqs, **kw):
        entered.set()
        assert release.wait(60)
        return real(seqs, **kw)

    monkeypatch.setattr(engine, "forward", gated)
    yield entered, release
    release.set()


def test_untruncated_tokenizer_is_built_at_start(ml_app):
    """The tokenizer that counts over-long inputs (truncate=false errors) is built before /ready: with the
    real 250k vocabulary that takes ~1 s holding the interpreter, which the first such request would
    otherwise spend stalling the event loop."""
    assert None in ml_app.service.served["ml"].model.engine._tokenizers


def test_a_request_too_slow_on_its_own_is_refused_outright(ml_app, monkeypatch):
    """Nothing queued, yet a request that alone would take more than twice the wait bound can never meet
    it: refused for good, 400 on /v1 (413 on the native routes) with no Retry-After; a request a
    little over the bound alone is still admitted (the estimate is noisy)."""
    batcher = ml_app.service.served["ml"].batcher
    rate = batcher.tokens_per_s
    assert rate > 0 and batcher.queued_tokens == 0
    monkeypatch.setattr(batcher, "max_queue_wait", 1000 / rate)  # BIG (3072 tokens) alone: ~3 x the bound
    with pytest.raises(openai.BadRequestError, match="alone would take") as e:
        ml_app.openai().embeddings.create(input=BIG, model="ml")
    assert e.value.body["code"] == "too_many_tokens" and "retry-after" not in e.value.response.headers
    r = ml_app.client.post("/embed", json={"inputs": BIG, "model": "ml"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens", r.text
    assert "retry-after" not in r.headers and "split it" in r.json()["error"]["message"]
    ids = ml_app.service.served["ml"].model.prepare(BIG).ids  # token ids: their exact count is checked
    r = ml_app.client.post("/v1/embeddings", json={"input": ids, "model": "ml"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_tokens", r.text
    ok = ml_app.client.post("/v1/embeddings", json={"input": BIG[:3], "model": "ml"})  # ~1.5 x the bound alone
    assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 3 * 512


def test_backpressure_and_disconnect(ml_app, gate):
    """A running 3k-token job: 3k more would wait too long (429); a small job fits and its client leaves."""
    entered, release = gate
    batcher = ml_app.service.served["ml"].batcher
    rate = batcher.tokens_per_s
    assert rate > 0  # measured by the calibration pass at start
    # The bound admits ~3.6k tokens ahead of a request: the running 3k job plus a small one.
    batcher.max_queue_wait = 3600 / rate

    async def scenario():
        async with ml_app.async_client() as c:
            before = (await c.get("/metrics")).text
            a = asyncio.create_task(c.post("/v1/embeddings", json={"input": BIG, "model": "ml"}))
            await asyncio.to_thread(entered.wait, 30)  # A is in the model now, and stays there
            over = await c.post("/v1/embeddings", json={"input": BIG, "model": "ml"})
            b = asyncio.create_task(c.post("/v1/embeddings", json={"input": ["short one"] * 5, "model": "ml"}))
            deadline = time.monotonic() + 30
            while batcher.pending_inputs < 5 and time.monotonic() < deadline:  # B is queued behind A ...
                await asyncio.sleep(0)
            b.cancel()  # ... and its client gives up
            with pytest.raises(asyncio.CancelledError):
                await b
            release.set()
            ra = await a
            # B's dropped inputs leave the queue (and are counted) when the worker next looks at it,
            # which may be after A's tokens are off the books.
            deadline = time.monotonic() + 30
            while (batcher.queued_tokens or batcher.pending_inputs) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            after = (await c.get("/metrics")).text
            return before, over, ra, after

    before, over, ra, after = ml_app.run(scenario())
    assert ra.status_code == 200 and ra.json()["usage"]["total_tokens"] == 6 * 512
    assert over.status_code == 429, over.text
    err = over.json()["error"]
    assert err["type"] == "rate_limit_error" and "busy" in err["message"]
    # Retry-After from the same estimate: when the queue and this request are done, at the measured
    # rate (the refusal may come before tokenizing, from a lower bound of the request's tokens).
    expected = (3072 + 3072) / rate
    assert 1 <= int(over.headers["retry-after"]) <= max(1, int(np.ceil(expected)))
    d = lambda name: metric(after, name, model="ml") - metric(before, name, model="ml")  # noqa: E731
    assert d("e5kit_dropped_inputs_total") == 5
    assert d("e5kit_model_tokens_total") == 6 * 512
    assert metric(after, "e5kit_queue_tokens", model="ml") == 0
    assert metric(after, "e5kit_requests_total", route="/v1/embeddings", status="429") >= 1


def test_token_cap_and_rate_limit_class(ml_app, gate):
    entered, release = gate
    c = ml_app.openai()
    # One request over the whole token cap (6000) is refused outright: 400 on /v1 (OpenAI's class).
    with pytest.raises(openai.BadRequestError, match="more than this server queues"):
        c.embeddings.create(input=BIG * 2, model="ml")
    batcher = ml_app.service.served["ml"].batcher
    batcher.max_queue_wait = 60.0  # now only the cap can refuse

    async def scenario():
        async with ml_app.async_client() as ac:
            a = asyncio.create_task(ac.post("/v1/embeddings", json={"input": BIG, "model": "ml"}))
            await asyncio.to_thread(entered.wait, 30)
            client = openai.AsyncOpenAI(base_url=ml_app.url + "/v1", api_key="x", max_retries=0,
                                        http_client=ml_app.async_client())
            try:
                await client.embeddings.create(input=BIG, model="ml")  # 3072 + 3072 > 6000
            except openai.RateLimitError as e:
                err = e
            else:
                err = None
            release.set()
            await a
            return err

    err = ml_app.run(scenario())
    assert isinstance(err, openai.RateLimitError) and int(err.response.headers["retry-after"]) >= 1
    assert ml_app.client.get("/ready").status_code == 200


def test_burst_gets_429_and_admitted_requests_finish_within_the_bound(ml_app, monkeypatch):
    """32 concurrent clients of 2 x 512 tokens against a 2 s bound: the excess is refused by the
    expected-wait rule with Retry-After, every admitted request is answered, p99 within twice the bound."""
    batcher = ml_app.service.served["ml"].batcher
    bound = 2.0
    monkeypatch.setattr(batcher, "max_queue_wait", bound)
    monkeypatch.setattr(batcher, "max_queued_tokens", 1 << 20)  # the token cap is far: only the wait refuses
    # The promise is only as good as the measured rate: measure it now, on the machine as loaded as it is
    # now (a fresh window, one request of well-filled passes), not at the module's start.
    monkeypatch.setattr(batcher, "_rate", _Throughput())
    warm = ml_app.client.post("/v1/embeddings", json={"input": BIG, "model": "ml"})
    assert warm.status_code == 200 and batcher.tokens_per_s > 0

    async def one(c, i):
        t0 = time.perf_counter()
        r = await c.post("/v1/embeddings", json={"input": [f"{i} {LONG}", f"{i} b {LONG}"], "model": "ml"})
        return r.status_code, time.perf_counter() - t0, r.headers.get("retry-after"), r

    async def scenario():
        async with ml_app.async_client() as c:
            return await asyncio.gather(*(one(c, i) for i in range(32)))

    results = ml_app.run(scenario())
    ok = [t for s, t, _, _ in results if s == 200]
    refused = [(ra, r) for s, _, ra, r in results if s == 429]
    assert len(ok) + len(refused) == 32, [s for s, *_ in results]
    assert ok and refused
    assert 32 * 1024 < batcher.max_queued_tokens
    for ra, r in refused:  # refused by the expected wait, with a Retry-After from the same estimate
        assert ra is not None and int(ra) >= 1 and f"(limit {bound:g} s)" in r.json()["error"]["message"], r.text
    for s, _, _, r in results:
        if s == 200:
            assert r.json()["usage"]["total_tokens"] == 1024
    p99 = float(np.percentile(ok, 99))
    print(f"burst: {len(ok)} admitted, {len(refused)} refused at {batcher.tokens_per_s:.0f} tokens/s; "
          f"admitted p99 {p99:.2f} s (bound {bound} s)")
    assert p99 <= 2 * bound, (p99, sorted(ok))


def test_drain_expiry_answers_503_with_retry_after(ml_app, gate):
    """Requests still waiting when the drain limit runs out get an OpenAI-shaped 503 + Retry-After."""
    entered, release = gate
    ml_app.service.served["ml"].batcher.max_queue_wait = 60.0
    life = ml_app.service.lifecycle

    async def scenario():
        async with ml_app.async_client() as c:
            tasks = [asyncio.create_task(c.post("/v1/embeddings", json={"input": BIG[:2], "model": "ml"}))
                     for _ in range(2)]
            await asyncio.to_thread(entered.wait, 30)
            life.begin_drain(0.2)
            ready = await c.get("/ready")
            results = await asyncio.gather(*tasks)
            release.set()
            return ready, results

    try:
        ready, results = ml_app.run(scenario())
    finally:
        life.draining = False
        life.expired.clear()
    assert ready.status_code == 503
    for r in results:
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/json") and int(r.headers["retry-after"]) >= 1
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "shutting_down" and "drain" in err["message"]
    assert ml_app.client.post("/v1/embeddings", json={"input": "after", "model": "ml"}).status_code == 200
