"""Prometheus metrics and per-key usage metering.

Every app gets its own ``CollectorRegistry`` (several apps can live in one process, as in tests).
Labels stay bounded: ``route`` is the matched route template ("unmatched" otherwise), ``model`` a
served model name or "-", ``key`` an API-key label (never the key itself), "anonymous" when the
server has no keys and "-" when the caller was not authenticated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batcher import BatchStats, Batcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("e5kit_requests", "HTTP requests by route, status, model and key",
                                ["route", "status", "model", "key"], registry=r)
        self.latency = Histogram("e5kit_request_duration_seconds", "Request latency in seconds",
                                 ["route", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("e5kit_tokens", "Tokens embedded (after prefix and truncation)",
                              ["model", "key"], registry=r)
        self.inputs = Counter("e5kit_inputs", "Inputs embedded", ["model", "key"], registry=r)
        self.cost = Counter("e5kit_cost_usd", "Metered cost at the configured price per million tokens",
                            ["model", "key"], registry=r)
        self.batch_size = Histogram("e5kit_batch_size", "Inputs per forward pass", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("e5kit_batch_tokens", "Tokens per forward pass", ["model"],
                                      buckets=TOKEN_BUCKETS, registry=r)
        self.batch_seconds = Histogram("e5kit_batch_duration_seconds", "Forward pass time", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.model_tokens = Counter("e5kit_model_tokens", "Tokens run through the model", ["model"], registry=r)
        self.queue_tokens = Gauge("e5kit_queue_tokens", "Tokens admitted and not yet embedded", ["model"], registry=r)
        self.queue_inputs = Gauge("e5kit_queue_inputs", "Inputs waiting for the model", ["model"], registry=r)
        self.dropped = Counter("e5kit_dropped_inputs", "Queued inputs dropped because the client went away",
                               ["model"], registry=r)
        self.rejected = Counter("e5kit_rejected_requests", "Requests refused because the queue was full",
                                ["model"], registry=r)

    def watch(self, name: str, batcher: Batcher) -> None:
        """Hook a batcher's callbacks and queue gauges to these metrics."""
        size, toks, secs, mtok = (self.batch_size.labels(name), self.batch_tokens.labels(name),
                                  self.batch_seconds.labels(name), self.model_tokens.labels(name))

        def on_batch(s: BatchStats) -> None:
            size.observe(s.size)
            toks.observe(s.tokens)
            secs.observe(s.seconds)
            mtok.inc(s.tokens)

        batcher.on_batch = on_batch
        batcher.on_drop = self.dropped.labels(name).inc
        self.queue_tokens.labels(name).set_function(lambda: batcher.queued_tokens)
        self.queue_inputs.labels(name).set_function(lambda: batcher.pending_inputs)

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class KeyUsage:
    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)


class UsageMeter:
    """Cumulative tokens, inputs and requests per API-key label, priced per million tokens."""

    def __init__(self, metrics: Metrics, price_per_million: float = 0.0):
        self.metrics = metrics
        self.price = float(price_per_million)
        self._lock = threading.Lock()
        self._usage: dict[str, KeyUsage] = {}

    def record(self, key: str, model: str, inputs: int, tokens: int) -> None:
        with self._lock:
            u = self._usage.setdefault(key, KeyUsage())
            u.requests += 1
            u.inputs += inputs
            u.tokens += tokens
            m = u.by_model.setdefault(model, {"requests": 0, "inputs": 0, "tokens": 0})
            m["requests"] += 1
            m["inputs"] += inputs
            m["tokens"] += tokens
        self.metrics.tokens.labels(model, key).inc(tokens)
        self.metrics.inputs.labels(model, key).inc(inputs)
        if self.price:
            self.metrics.cost.labels(model, key).inc(tokens * self.price / 1e6)

    def report(self, key: str) -> dict:
        with self._lock:
            u = self._usage.get(key, KeyUsage())
            return {
                "object": "usage",
                "key": key,
                "requests": u.requests,
                "inputs": u.inputs,
                "total_tokens": u.tokens,
                "price_per_million_tokens": self.price,
                "cost_usd": u.tokens * self.price / 1e6,
                "models": {name: dict(m, cost_usd=m["tokens"] * self.price / 1e6) for name, m in u.by_model.items()},
            }
