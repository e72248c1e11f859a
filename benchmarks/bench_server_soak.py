"""Soak: a moderate open-loop load on `e5kit serve` for 10 minutes, server RSS sampled every 5 s.

Requests of 1..8 SciFact passages are sent on a schedule, whatever the answers, so that the tokens
offered per second are --load (default 0.5) x the engine's offline throughput on the same passages
(measured first, before the server starts): the run measures memory under steady work, not overload.
After a 429 a request is retried as --retry says (honour: Retry-After plus jitter, as the openai
client; hostile: after 50 ms). Reports RSS at start and end, the least-squares slope (MB per minute)
over the run, statuses, the share of 429s (above 1% the run is marked INVALID: it measured overload,
not a soak) and the p99 latency of the answered requests (from first send, retries included).

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_server_soak.py --minutes 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import RETRY_POLICIES, OfflineEngine, Server, build_random_e5_small, retry_delay, scifact_passages  # noqa: E402

MAX_429_SHARE = 0.01


async def soak(server: Server, texts: list[str], tokens: list[int], rate: float, seconds: float, every: float,
               retry: str) -> dict:
    """Offer ``rate`` tokens/s (``tokens[i]``: the tokens of ``texts[i]`` as embedded) for ``seconds``."""
    samples: list[tuple[float, float]] = []
    lat: list[float] = []
    statuses: dict[int, int] = {}
    in_flight: set[asyncio.Task] = set()
    t_start = time.monotonic()

    async def sample():
        while True:
            samples.append((time.monotonic() - t_start, server.rss_mb()))
            await asyncio.sleep(every)

    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
        async def request(batch: list[str]):
            t0 = time.perf_counter()
            while True:
                try:
                    r = await c.post("/v1/embeddings", json={"model": "bench", "input": batch, "input_type": "passage"})
                except httpx.HTTPError:
                    statuses[-1] = statuses.get(-1, 0) + 1
                    return
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 429:
                    break
                await asyncio.sleep(retry_delay(r, retry))
            if r.status_code == 200:
                lat.append(time.perf_counter() - t0)

        async def generate():  # open loop: the schedule never waits for answers
            i, due = 0, time.monotonic()
            while True:
                picks = [(i + j) % len(texts) for j in range(1 + i % 8)]
                i += len(picks)
                task = asyncio.create_task(request([texts[k] for k in picks]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                due += sum(tokens[k] for k in picks) / rate
                await asyncio.sleep(max(0.0, due - time.monotonic()))

        tasks = [asyncio.create_task(sample()), asyncio.create_task(generate())]
        await asyncio.sleep(seconds)
        for t in [*tasks, *in_flight]:
            t.cancel()
        await asyncio.gather(*tasks, *in_flight, return_exceptions=True)
    samples.append((time.monotonic() - t_start, server.rss_mb()))
    xs, ys = [t / 60 for t, _ in samples], [r for _, r in samples]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    # The first minute includes warm-up (allocator growth, kernel caches): the slope after it too.
    late = [(x, y) for x, y in zip(xs, ys) if x >= 1.0]
    lmx, lmy = statistics.mean(x for x, _ in late), statistics.mean(y for _, y in late)
    late_slope = sum((x - lmx) * (y - lmy) for x, y in late) / sum((x - lmx) ** 2 for x, _ in late)
    lat.sort()
    answers = sum(n for s, n in statuses.items() if s > 0)
    return {"samples": len(samples), "rss_start_mb": ys[0], "rss_end_mb": ys[-1], "rss_max_mb": max(ys),
            "slope_mb_per_min": slope, "slope_after_1min_mb_per_min": late_slope, "statuses": statuses,
            "share_429": statuses.get(429, 0) / max(1, answers),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: random e5-small-v2 shape)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--load", type=float, default=0.5, help="tokens/s offered, as a fraction of the engine offline")
    ap.add_argument("--retry", choices=RETRY_POLICIES, default="honour",
                    help="after a 429: wait Retry-After + jitter (honour, as the openai client) or 50 ms (hostile)")
    ap.add_argument("--offline-texts", type=int, default=64, help="passages for the offline throughput measurement")
    ap.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    args = ap.parse_args()
    if not 0 < args.load <= 1:
        ap.error("--load must be in (0, 1]")
    model = args.model or build_random_e5_small(Path.home() / ".cache" / "e5kit-bench" / "e5-small-v2-random")
    texts = scifact_passages(1024)
    engine = OfflineEngine(model, texts[:args.offline_texts])
    offline = engine.tokens_per_s(10.0)
    tokens = [len(ids) for ids in engine.m.prepare(texts, "passage").ids]
    del engine
    rate = args.load * offline
    server = Server(model, [], Path(os.environ.get("TMPDIR", "/tmp")) / "bench_server_soak.log")
    try:
        r = asyncio.run(soak(server, texts, tokens, rate, args.minutes * 60, args.every, args.retry))
    finally:
        code = server.stop()
    verdict = "valid" if r["share_429"] <= MAX_429_SHARE else f"INVALID (429s over {MAX_429_SHARE:.0%}: overload, not a soak)"
    print(f"soak {args.minutes:g} min, open loop at {rate:.0f} tokens/s ({args.load:g} x {offline:.0f} offline), "
          f"--retry {args.retry}: RSS start {r['rss_start_mb']:.0f} MB, end "
          f"{r['rss_end_mb']:.0f} MB, max {r['rss_max_mb']:.0f} MB ({r['samples']} samples every {args.every:g} s); "
          f"slope {r['slope_mb_per_min']:+.2f} MB/min ({r['slope_after_1min_mb_per_min']:+.2f} after the first minute); "
          f"statuses {r['statuses']}; 429s {r['share_429']:.1%} of answers, {verdict}; p99 {r['p99_ms']:.0f} ms; "
          f"exit code {code}", flush=True)


if __name__ == "__main__":
    main()
