"""`e5kit serve` settings: one dataclass, one flag (and E5KIT_* variable) per field.

The defaults live here and only here; :mod:`e5kit.server.cli` builds its options from these fields,
as ``e5kit train`` does from ``TrainConfig``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

INPUT_TYPES = ("query", "passage", "raw")
MAX_BATCH_TOKENS = 16384
MAX_BATCH_SIZE = 32
MAX_QUEUED_TOKENS = 1 << 20


def _opt(default, help: str, cli: bool = True):
    return field(default=default, metadata={"help": help, "cli": cli})


@dataclass
class ServerConfig:
    """Limits and defaults of a served app (every field is an `e5kit serve` flag and an E5KIT_* variable)."""

    # ---- what one request may ask ----
    max_inputs: int = _opt(2048, "Most inputs in one request.")
    max_body_bytes: int = _opt(16 << 20, "Largest request body in bytes.")
    max_response_bytes: int = _opt(32 << 20, "Largest /tokenize response in bytes (413 beyond).")
    default_input_type: str = _opt("query", "Prefix used when a request gives no input_type: query, passage or "
                                            "raw ('query' suits symmetric use).")
    auto_truncate: bool = _opt(True, "Cut inputs longer than the model's limit unless a request says truncate=false.")
    # ---- batching and admission ----
    max_batch_tokens: int = _opt(MAX_BATCH_TOKENS, "Tokens the worker takes from the queue at once. Each forward "
                                 "pass keeps to min(this, the engine's budget): on CPU that is a cache-sized "
                                 "budget, so a larger value only lets more requests share one window.")
    max_batch_size: int = _opt(MAX_BATCH_SIZE, "Most inputs in one forward pass.")
    max_wait_ms: float = _opt(2.0, "Longest wait for a batch to fill, in milliseconds.")
    max_queue_wait: float = _opt(5.0, "Admit a request only if its expected completion (queued tokens ahead plus "
                                      "its own, over the measured throughput) is within this many seconds; "
                                      "otherwise 429 with Retry-After from the same estimate. A request that "
                                      "alone would take more than twice this is refused outright (split it).")
    max_queued_tokens: int = _opt(MAX_QUEUED_TOKENS, "Hard cap on tokens admitted but not yet embedded (429 beyond; "
                                                     "a single request over it is refused outright).")
    tokenize_workers: int = _opt(2, "Threads that parse large bodies, tokenize and serialize large responses for the "
                                    "embedding routes (off the event loop; /tokenize has a thread of its own).")
    price_per_million: float = _opt(0.0, "USD per million tokens (metering).")
    # ---- connections (uvicorn) ----
    drain_timeout: float = _opt(30.0, "Seconds in-flight requests may take after SIGTERM; the rest get 503 + "
                                      "Retry-After. Must be at least --max-queue-wait.")
    request_timeout: float = _opt(30.0, "Seconds a client may take to send a request's headers and body "
                                        "(slow clients are cut off: slowloris).")
    keep_alive_timeout: float = _opt(5.0, "Seconds an idle keep-alive connection stays open.")
    max_connections: int = _opt(1024, "Concurrent connections; beyond it new requests get 503 (uvicorn's "
                                      "limit_concurrency).")

    def __post_init__(self):
        if self.default_input_type not in INPUT_TYPES:
            raise ValueError(f"default input type must be one of {INPUT_TYPES}, not {self.default_input_type!r}")
        for name in ("max_inputs", "max_body_bytes", "max_response_bytes", "max_batch_size", "max_queued_tokens",
                     "tokenize_workers", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        for name in ("max_queue_wait", "request_timeout", "keep_alive_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_wait_ms < 0 or self.price_per_million < 0 or self.drain_timeout < 0:
            raise ValueError("max_wait_ms, price_per_million and drain_timeout must be >= 0")
        if self.drain_timeout < self.max_queue_wait:
            # Admission promises every admitted request finishes within max_queue_wait (expected);
            # a shorter drain would cut off requests the server has already promised to answer.
            raise ValueError(f"drain_timeout ({self.drain_timeout}) must be at least max_queue_wait "
                             f"({self.max_queue_wait})")

    def describe(self) -> str:
        return " ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def option_fields() -> list[dataclasses.Field]:
    """The fields that are `e5kit serve` flags."""
    return [f for f in dataclasses.fields(ServerConfig) if f.metadata.get("cli", True)]


__all__ = ["ServerConfig", "INPUT_TYPES", "MAX_BATCH_TOKENS", "MAX_BATCH_SIZE", "MAX_QUEUED_TOKENS", "option_fields"]
