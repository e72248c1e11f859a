"""Dynamic batching: one queue and one model worker thread per served model.

Request handlers (on the event loop) tokenize, then :meth:`Batcher.submit` a job of token-id
sequences. The worker thread takes queued sequences in arrival order up to a token budget (waiting
at most ``max_wait`` for more when the queue is short), sorts that window by length and splits it
with :func:`e5kit.engine.plan_batches` (at most ``max_batch_size`` inputs per pass, as
``E5.encode`` does offline), runs :meth:`Engine.forward` on each part, and resolves the
job's asyncio future with ``loop.call_soon_threadsafe`` once all its rows are done. The event loop
never runs the model; a failing batch fails only the jobs in it, never the worker.

Admission by expected wait: the worker measures its throughput (tokens per second of forward
time, over recent full batches; one calibration pass at start seeds it). A job is admitted only if
the tokens queued ahead of it plus its own, at that rate, are done within ``max_queue_wait``
seconds (or nothing is queued ahead of it); otherwise :class:`QueueFull` carries a Retry-After from
the same estimate, counting the jobs refused before it as if queued (so the refused come back spread
out, not all at once when the queue is done). ``max_queued_tokens`` stays a hard cap. A job that alone is larger than the cap, or
alone would take more than ``LONE_JOB_FACTOR`` x ``max_queue_wait`` at the measured rate, can never be
admitted within the bound: :class:`TooManyTokens` (the factor leaves room for a noisy estimate, so a
job just over the bound on a slow measurement is not refused for good). A cancelled job (its client
went away) has its queued sequences dropped before they reach the model.

The vectors are mean-pooled and unnormalised (``Engine.forward``); normalisation, ``dimensions``
and precision are :func:`e5kit.pipeline.finish`'s, applied by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..engine import Engine, plan_batches
from .config import MAX_BATCH_SIZE, MAX_BATCH_TOKENS, MAX_QUEUED_TOKENS

log = logging.getLogger("e5kit.server")

LONE_JOB_FACTOR = 2  # a job alone may be expected to take up to this many times max_queue_wait
RETRY_AFTER_MAX = 60  # seconds (the openai client gives up on a Retry-After over 2 minutes)


class QueueFull(RuntimeError):
    """Admitting this job now would break the wait bound (or the token cap)."""

    def __init__(self, queued: int, expected_wait: float, bound: float, retry_after: int):
        self.queued, self.expected_wait, self.bound, self.retry_after = queued, expected_wait, bound, retry_after
        super().__init__(f"the server is busy: {queued} tokens queued ahead, this request would finish in about "
                         f"{expected_wait:.1f} s (limit {bound:g} s); retry in {retry_after} s")


class TooManyTokens(ValueError):
    """The job alone is more than this server ever admits (not retryable: split it)."""

    def __init__(self, n_tokens: int, at_least: bool, why: str):
        self.n_tokens = n_tokens
        super().__init__(f"the request has {'at least ' if at_least else ''}{n_tokens} tokens, {why}; "
                         "split it into smaller requests")


class ShuttingDown(RuntimeError):
    """The batcher has stopped and takes no new work."""


@dataclass(eq=False)
class Job:
    seqs: list[list[int]]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    out: np.ndarray
    remaining: int
    untaken_tokens: int
    cancelled: bool = False
    done: bool = False

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


@dataclass
class BatchStats:
    """What the worker reports after each forward pass (for metrics)."""

    size: int
    tokens: int
    seconds: float


class _Throughput:
    """Tokens per second of forward time over the last ``window`` seconds of well-filled batches."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._samples: deque[tuple[int, float]] = deque()
        self._tokens, self._seconds = 0, 0.0

    @property
    def tokens_per_s(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0

    def update(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        self._samples.append((tokens, seconds))
        self._tokens += tokens
        self._seconds += seconds
        while len(self._samples) > 1 and self._seconds - self._samples[0][1] >= self.window:
            t, s = self._samples.popleft()
            self._tokens -= t
            self._seconds -= s


def _resolve(fut: asyncio.Future, value=None, exc: BaseException | None = None) -> None:
    if fut.done():  # the handler gave up (client disconnected) or the loop is shutting down
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(value)


class Batcher:
    """The queue and the single worker thread for one model."""

    def __init__(
        self,
        engine: Engine,
        name: str,
        max_batch_tokens: int = MAX_BATCH_TOKENS,
        max_batch_size: int = MAX_BATCH_SIZE,
        max_wait: float = 0.002,
        max_queued_tokens: int = MAX_QUEUED_TOKENS,
        max_queue_wait: float = 5.0,
        calibrate: bool = True,
        on_batch: Callable[[BatchStats], None] | None = None,
        on_drop: Callable[[int], None] | None = None,
    ):
        if max_batch_tokens < engine.max_tokens:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must be at least the model's input limit "
                             f"({engine.max_tokens}) so every input fits in a batch")
        if max_batch_size < 1 or max_queued_tokens < 1 or max_wait < 0 or max_queue_wait <= 0:
            raise ValueError("max_batch_size, max_queued_tokens and max_queue_wait must be positive and max_wait >= 0")
        self.engine, self.name = engine, name
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.max_wait, self.max_queued_tokens, self.max_queue_wait = max_wait, max_queued_tokens, max_queue_wait
        self.budget = engine.batch_budget(max_batch_tokens)  # padded tokens per forward pass
        self.calibrate = calibrate
        self.ready = threading.Event()  # set once the worker runs (after its calibration pass)
        self.on_batch, self.on_drop = on_batch, on_drop
        self._cond = threading.Condition()
        self._pending: deque[tuple[Job, int, float]] = deque()  # (job, row, arrival time)
        self._queued_tokens = 0  # admitted, not yet embedded (pending or in the running batch)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rate = _Throughput()
        self._horizon = 0.0  # monotonic time when the jobs refused so far could be done (see _promise)
        self.dropped = 0

    # ---- state ---------------------------------------------------------------------------

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    @property
    def pending_inputs(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def tokens_per_s(self) -> float:
        """Measured throughput (0 until the first measurement)."""
        return self._rate.tokens_per_s

    def expected_wait(self, n_tokens: int, queued: int | None = None) -> float:
        """Seconds until a job of ``n_tokens`` admitted now would be done (0 while unmeasured)."""
        queued = self._queued_tokens if queued is None else queued
        rate = self._rate.tokens_per_s
        return (queued + n_tokens) / rate if rate > 0 else 0.0

    def admit(self, n_tokens: int, queued: int | None = None, at_least: bool = False) -> None:
        """Raise :class:`TooManyTokens` if a job of ``n_tokens`` (``at_least``: or more) can never be
        admitted, :class:`QueueFull` unless it may be queued now (see the module doc)."""
        queued = self._queued_tokens if queued is None else queued
        rate = self._rate.tokens_per_s
        if n_tokens > self.max_queued_tokens:
            raise TooManyTokens(n_tokens, at_least, f"more than this server queues at once ({self.max_queued_tokens})")
        most = LONE_JOB_FACTOR * self.max_queue_wait
        if rate > 0 and n_tokens / rate > most:
            raise TooManyTokens(n_tokens, at_least,
                                f"which alone would take about {n_tokens / rate:.1f} s at this server's measured "
                                f"{rate:.0f} tokens/s, more than the {most:g} s it allows one request "
                                f"({LONE_JOB_FACTOR} x --max-queue-wait); requests of up to {int(most * rate)} tokens fit")
        if queued == 0:  # nothing ahead: the job can only wait for itself
            return
        wait = self.expected_wait(n_tokens, queued)
        over_cap = queued + n_tokens > self.max_queued_tokens
        if wait > self.max_queue_wait or over_cap:
            if over_cap:  # until enough of the queue has gone for this job to fit under the cap
                free_in = (queued + n_tokens - self.max_queued_tokens) / rate if rate > 0 else 1.0
            else:
                free_in = self._promise(n_tokens, queued)
            raise QueueFull(queued, wait, self.max_queue_wait, int(min(RETRY_AFTER_MAX, max(1, math.ceil(free_in)))))

    def _promise(self, n_tokens: int, queued: int) -> float:
        """Seconds until a refused job could be done: after what is queued now and after the jobs refused
        before it, which were told to come back earlier (the first of them when the queue is done).

        Telling every refused client "when the queue is done" brings them all back at once, and nearly
        all are refused again: under 512 clients the refusals alone took ~40% of a 2-core machine. Each
        promise pushes the horizon by the job's own time at the measured rate, so the returns spread
        over the time the engine needs to serve them. The horizon only shapes Retry-After, never
        admission, and is capped (a client retrying against its Retry-After cannot push it far).
        """
        now = time.monotonic()
        rate = self._rate.tokens_per_s
        with self._cond:
            start = max(now + queued / rate, self._horizon)
            self._horizon = min(start + n_tokens / rate, now + RETRY_AFTER_MAX)
            return self._horizon - now

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"e5kit-worker[{self.name}]", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the event-loop side ---------------------------------------------------------------

    def submit(self, seqs: Sequence[Sequence[int]]) -> Job:
        """Queue token-id sequences; the returned job's future resolves to an (n, dim) float32 array
        of pooled, unnormalised vectors.

        Must be called from the event loop thread that will await the future.
        """
        loop = asyncio.get_running_loop()
        seqs = [list(s) for s in seqs]
        n_tokens = sum(len(s) for s in seqs)
        job = Job(seqs=seqs, loop=loop, future=loop.create_future(),
                  out=np.empty((len(seqs), self.engine.dim), dtype=np.float32), remaining=len(seqs),
                  untaken_tokens=n_tokens)
        if not seqs:
            job.future.set_result(job.out)
            return job
        now = time.monotonic()
        with self._cond:
            if self._stopping or not self.alive:
                raise ShuttingDown(f"model {self.name} is not accepting work")
            self.admit(n_tokens)
            self._queued_tokens += n_tokens
            self._pending.extend((job, i, now) for i in range(len(seqs)))
            self._cond.notify()
        return job

    def check_room(self, min_tokens: int) -> None:
        """:meth:`admit` for a lower bound of a job's tokens (saves tokenizing a doomed request)."""
        self.admit(min_tokens, at_least=True)

    def cancel(self, job: Job) -> None:
        """Drop the job's sequences that have not reached the model yet."""
        with self._cond:
            if job.cancelled or job.done:
                return
            job.cancelled = True
            self._queued_tokens -= job.untaken_tokens
            job.untaken_tokens = 0
        job.future.cancel()

    # ---- the worker thread -----------------------------------------------------------------

    def _take(self) -> list[tuple[Job, int]]:
        """Pop the next window of sequences (arrival order, within the token budget)."""
        window: list[tuple[Job, int]] = []
        tokens = 0
        while self._pending:
            job, row, _ = self._pending[0]
            if job.cancelled:
                if not job.done:  # its client went away (a failed job's leftovers are not counted)
                    self.dropped += 1
                    if self.on_drop is not None:
                        self.on_drop(1)
                self._pending.popleft()  # after counting: an empty queue means every drop is counted
                continue
            n = len(job.seqs[row])
            if window and tokens + n > self.max_batch_tokens:
                break
            self._pending.popleft()
            job.untaken_tokens -= n
            window.append((job, row))
            tokens += n
        return window

    def _pending_tokens_at_least(self, budget: int) -> bool:
        tokens = 0
        for job, row, _ in self._pending:
            if not job.cancelled:
                tokens += len(job.seqs[row])
                if tokens >= budget:
                    return True
        return False

    def _calibrate(self) -> None:
        """One forward pass of full-length rows (the slowest tokens per second) seeds the estimate."""
        tok = self.engine.tokenize(["calibration " * 1000], truncate=True).ids[0]
        rows = [tok] * max(1, min(self.max_batch_size, self.budget // len(tok)))
        self.engine.forward(rows[:1])  # the first pass may build kernels
        t0 = time.perf_counter()
        self.engine.forward(rows)
        self._rate.update(len(rows) * len(tok), time.perf_counter() - t0)

    def _run(self) -> None:
        if self.calibrate:
            try:
                self._calibrate()
            except Exception:  # the first real batch measures instead
                log.exception("model %s: calibration pass failed", self.name)
        self.ready.set()
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending and self._stopping:
                    return
                if self.max_wait > 0 and not self._stopping:
                    # A short queue may fill within max_wait of its oldest arrival; under load the
                    # oldest item has already waited through the previous batch, so this is free.
                    deadline = self._pending[0][2] + self.max_wait
                    while not self._stopping and not self._pending_tokens_at_least(self.max_batch_tokens):
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                window = self._take()
            if window:
                self._process(window)

    def _process(self, window: list[tuple[Job, int]]) -> None:
        lengths = [len(job.seqs[row]) for job, row in window]
        # The window may be large; each forward pass keeps to the engine's (cache-sized on CPU) budget.
        for part in plan_batches(lengths, self.max_batch_size, self.budget):
            self._run_part([window[i] for i in part])

    def _run_part(self, items: list[tuple[Job, int]]) -> None:
        dead = [(job, row) for job, row in items if job.cancelled or job.done]
        if dead:  # their clients left (or an earlier part of the job failed) after the window was taken
            self._finish(dead, None, None)
            items = [it for it in items if not (it[0].cancelled or it[0].done)]
            if not items:
                return
        ntok = sum(len(job.seqs[row]) for job, row in items)
        t0 = time.perf_counter()
        try:
            rows = self._forward(items)
        except Exception as e:  # never let one bad batch kill the worker
            jobs = list(dict.fromkeys(job for job, _ in items))
            if len(jobs) > 1:  # retry job by job, so one request's failure is not its batch-mates'
                log.warning("model %s: a batch of %d inputs failed (%s); retrying request by request",
                            self.name, len(items), e)
                for job in jobs:
                    self._run_part([it for it in items if it[0] is job])
                return
            log.exception("model %s: a request of %d inputs failed", self.name, len(items))
            self._finish(items, None, e)
            return
        dt = time.perf_counter() - t0
        self._finish(items, rows, None)
        if ntok * 4 >= self.budget:  # short batches (a quiet queue) say little about throughput
            self._rate.update(ntok, dt)
        if self.on_batch is not None:
            try:
                self.on_batch(BatchStats(size=len(items), tokens=ntok, seconds=dt))
            except Exception:  # metrics must not break serving
                log.exception("batch metrics callback failed")

    def _forward(self, items: list[tuple[Job, int]]) -> np.ndarray:
        vecs = self.engine.forward([job.seqs[row] for job, row in items])
        return vecs.float().cpu().numpy()

    def _finish(self, items, rows, err) -> None:
        finished: list[Job] = []
        failed: set[Job] = set()
        with self._cond:
            self._queued_tokens -= sum(len(job.seqs[row]) for job, row in items)
            for k, (job, row) in enumerate(items):
                if job.cancelled or job.done:
                    continue
                if err is not None:
                    failed.add(job)
                    continue
                job.out[row] = rows[k]
                job.remaining -= 1
                if job.remaining == 0:
                    job.done = True
                    finished.append(job)
            for job in failed:  # drop the rest of a failed job too
                job.done = True
                self._queued_tokens -= job.untaken_tokens
                job.untaken_tokens = 0
                job.cancelled = True
        for job in finished:
            _call(job.loop, _resolve, job.future, job.out)
        for job in failed:
            _call(job.loop, _resolve, job.future, None, RuntimeError(f"embedding failed: {err}"))


def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


__all__ = ["Batcher", "Job", "BatchStats", "QueueFull", "TooManyTokens", "ShuttingDown"]
