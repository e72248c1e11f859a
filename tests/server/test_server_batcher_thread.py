"""The batcher in-process with a real tiny engine: a failing request fails only itself."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from e5kit import E5
from e5kit.server.batcher import Batcher, QueueFull, ShuttingDown, TooManyTokens


@pytest.fixture(scope="module")
def engine(tiny_bert):
    return E5(str(tiny_bert)).engine


def test_bad_batch_fails_its_jobs_and_the_worker_lives(engine):
    b = Batcher(engine, "t", max_wait=0.05)
    b.start()

    async def run():
        good = b.submit([[2, 10, 11, 3]])
        bad = b.submit([[2, 10 ** 6, 3]])  # an id past the embedding table: the forward pass raises
        done = await asyncio.gather(good.future, bad.future, return_exceptions=True)
        after = await b.submit([[2, 10, 11, 3], [2, 12, 3]]).future
        return done, after

    (good, bad), after = asyncio.run(run())
    assert isinstance(bad, RuntimeError) and "embedding failed" in str(bad)
    assert b.alive and b.queued_tokens == 0
    # Pooled, unnormalised: what the engine's forward pass gives.
    np.testing.assert_allclose(after[0], engine.forward([[2, 10, 11, 3]])[0].numpy(), atol=1e-5)
    # It shared a batch with the bad job: the worker retried it alone.
    np.testing.assert_allclose(good[0], after[0], atol=1e-5)
    b.stop()
    assert not b.alive
    with pytest.raises(ShuttingDown):
        asyncio.run(_submit(b, [[2, 3]]))


async def _submit(b, seqs):
    return await b.submit(seqs).future


def test_limits(engine):
    b = Batcher(engine, "t", max_queued_tokens=600, max_wait=0)
    b.start()
    with pytest.raises(TooManyTokens):
        asyncio.run(_submit(b, [[2] + [10] * 600 + [3]]))
    assert asyncio.run(_submit(b, [[2] + [10] * 500 + [3]])).shape == (1, engine.dim)
    b.stop()
    with pytest.raises(ValueError, match="at least the model's input limit"):
        Batcher(engine, "t", max_batch_tokens=100)


def test_admission_arithmetic(engine):
    """Expected wait = (queued ahead + own) / measured rate; Retry-After = that wait (when the queue is done); a job
    that alone takes more than twice the bound is refused for good."""
    b = Batcher(engine, "t", max_queued_tokens=10_000, max_queue_wait=2.0, calibrate=False)
    assert b.tokens_per_s == 0
    b.admit(5000, queued=3000)  # unmeasured: only the cap applies
    b._rate.update(1000, 1.0)  # 1000 tokens/s
    b.admit(3900, queued=0)  # nothing ahead, 3.9 s alone: over the bound, within twice it (a noisy estimate)
    with pytest.raises(TooManyTokens, match=r"about 5\.0 s .* up to 4000 tokens fit"):
        b.admit(5000, queued=0)  # 5 s alone: more than twice the bound, so never admissible
    with pytest.raises(TooManyTokens, match="at least 5000 tokens"):
        b.check_room(5000)  # the pre-tokenization check on a lower bound of the tokens
    b.admit(500, queued=1500)  # 2.0 s: at the bound
    with pytest.raises(QueueFull) as e:
        b.admit(600, queued=1500)  # 2.1 s
    assert e.value.retry_after == 3 and e.value.expected_wait == pytest.approx(2.1)  # ceil(2.1)
    with pytest.raises(QueueFull) as e:
        b.admit(1000, queued=6000)  # 7 s: 5 s over the bound
    assert e.value.retry_after == 7
    # Refused jobs count for the next refusal's Retry-After as if queued: returns spread out over the
    # time the engine needs to serve them (not all at once when the queue is done), capped at 60 s.
    # The horizon shapes Retry-After only: admission still looks at the real queue.
    b._horizon = 0.0
    retry = []
    for _ in range(4):
        with pytest.raises(QueueFull) as e:
            b.admit(1000, queued=3000)  # 4 s each, then 5, 6, 7 s (each 1 s more than the last)
        retry.append(e.value.retry_after)
    assert retry == [4, 5, 6, 7]
    b.admit(1000, queued=1000)  # within the bound: admitted whatever was promised before
    for _ in range(60):
        with pytest.raises(QueueFull) as e:
            b.admit(1000, queued=3000)
    assert e.value.retry_after == 60
    b._horizon = time.monotonic() - 1  # the promises have expired
    with pytest.raises(QueueFull) as e:
        b.admit(1000, queued=3000)
    assert e.value.retry_after == 4
    b.max_queue_wait = 100.0
    with pytest.raises(QueueFull) as e:
        b.admit(5000, queued=8000)  # over the token cap: until 3000 tokens have gone, 3 s
    assert e.value.retry_after == 3
