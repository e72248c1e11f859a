"""Soak: moderate load on `e5kit serve` for 10 minutes, server RSS sampled every 5 s.

16 clients in closed loops, requests of 1..8 SciFact passages, the default limits. Reports RSS at
start and end, the least-squares slope (MB per minute) over the run, requests, errors and p99.

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
from bench_server import Server, build_random_e5_small, scifact_passages  # noqa: E402


async def soak(server: Server, texts: list[str], clients: int, seconds: float, every: float) -> dict:
    samples: list[tuple[float, float]] = []
    lat: list[float] = []
    statuses: dict[int, int] = {}
    t_start = time.monotonic()

    async def sample():
        while True:
            samples.append((time.monotonic() - t_start, server.rss_mb()))
            await asyncio.sleep(every)

    async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
        async def client(k: int):
            i = k * 7919
            while True:
                n = 1 + (i % 8)
                batch = [texts[(i + j) % len(texts)] for j in range(n)]
                i += n
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/embeddings", json={"model": "bench", "input": batch, "input_type": "passage"})
                except httpx.HTTPError:
                    statuses[-1] = statuses.get(-1, 0) + 1
                    continue
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(time.perf_counter() - t0)

        tasks = [asyncio.create_task(sample())] + [asyncio.create_task(client(k)) for k in range(clients)]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    samples.append((time.monotonic() - t_start, server.rss_mb()))
    xs, ys = [t / 60 for t, _ in samples], [r for _, r in samples]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    # The first minute includes warm-up (allocator growth, kernel caches): the slope after it too.
    late = [(x, y) for x, y in zip(xs, ys) if x >= 1.0]
    lmx, lmy = statistics.mean(x for x, _ in late), statistics.mean(y for _, y in late)
    late_slope = sum((x - lmx) * (y - lmy) for x, y in late) / sum((x - lmx) ** 2 for x, _ in late)
    lat.sort()
    return {"samples": len(samples), "rss_start_mb": ys[0], "rss_end_mb": ys[-1], "rss_max_mb": max(ys),
            "slope_mb_per_min": slope, "slope_after_1min_mb_per_min": late_slope, "statuses": statuses,
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))] if lat else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: random e5-small-v2 shape)")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    args = ap.parse_args()
    model = args.model or build_random_e5_small(Path.home() / ".cache" / "e5kit-bench" / "e5-small-v2-random")
    server = Server(model, [], Path(os.environ.get("TMPDIR", "/tmp")) / "bench_server_soak.log")
    try:
        r = asyncio.run(soak(server, scifact_passages(1024), args.clients, args.minutes * 60, args.every))
    finally:
        code = server.stop()
    print(f"soak {args.minutes:g} min, {args.clients} clients: RSS start {r['rss_start_mb']:.0f} MB, end "
          f"{r['rss_end_mb']:.0f} MB, max {r['rss_max_mb']:.0f} MB ({r['samples']} samples every {args.every:g} s); "
          f"slope {r['slope_mb_per_min']:+.2f} MB/min ({r['slope_after_1min_mb_per_min']:+.2f} after the first minute); "
          f"statuses {r['statuses']}; p99 {r['p99_ms']:.0f} ms; exit code {code}", flush=True)


if __name__ == "__main__":
    main()
