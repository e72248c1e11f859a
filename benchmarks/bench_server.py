"""Load test of `e5kit serve` on loopback, against the engine's offline throughput on the same texts.

A bounded async load generator (httpx): C clients, each sending its next request as soon as the last
one is answered, for D seconds; requests carry 1 or 32 SciFact passages (`input_type: passage`).
After a 429 a client waits Retry-After plus up to 0.25 s of jitter, as the openai client does
(`--retry honour`, default), or retries after a fixed 50 ms whatever Retry-After says (`--retry hostile`).
Reports requests/s, tokens/s (from the responses' usage), p50/p99 latency, errors and the server's
peak RSS per run, then the engine's offline tokens/s on the same texts (E5.encode_passages, batch 32)
and the ratio. Then the overload run: 512 clients of the longest passages (4 per request) for 60 s
against the default admission (--max-queue-wait 5): share of 429s, p50/p99 of the admitted requests
(target: p99 within 2x the wait bound), tokens/s against the engine offline (target >= 80%), RSS.
Last (--health-probe) /health latency while clients send 6 MB /tokenize requests, for this checkout
or another one (--src, e.g. an older commit's src/) to compare.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_server.py --duration 30
    flock /tmp/e5kit-cpu.lock python benchmarks/bench_server.py --clients '' --retry hostile
    flock /tmp/e5kit-cpu.lock python benchmarks/bench_server.py --clients '' --health-probe

Model: a random-weight e5-small-v2-shaped BERT built from ../shared/models/e5-small-v2-tokenizer
(weights do not matter for speed), or any checkpoint directory with --model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT / "src"))


def build_random_e5_small(out: Path) -> Path:
    """BertModel(BertConfig.from_pretrained(tokenizer dir)) with random weights + the real tokenizer files."""
    src = SHARED / "models" / "e5-small-v2-tokenizer"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig.from_pretrained(str(src)), add_pooling_layer=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for f in src.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def scifact_passages(n: int) -> list[str]:
    out = []
    with open(SHARED / "data" / "scifact" / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            out.append(f"{d.get('title', '')} {d['text']}".strip())
            if len(out) >= n:
                break
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, extra: list[str], log: Path, src: Path = ROOT / "src"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(src))
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "e5kit", "serve", "-m", f"bench={model}", "--port", str(self.port),
             "--no-access-log", *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited: see {log}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit("server did not start")

    def rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return _status_kb(self.proc.pid, "VmHWM") / 1024

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        self.log.close()
        return code


def _status_kb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return 0.0


RETRY_POLICIES = ("honour", "hostile")


def retry_delay(r: httpx.Response, policy: str) -> float:
    """Seconds a client waits before retrying after a 429: Retry-After plus up to 0.25 s of jitter (so
    retries do not arrive in lockstep), as the openai client honours it ("honour"); or a fixed 50 ms
    whatever Retry-After says ("hostile": a client that ignores the server's advice)."""
    if policy == "hostile":
        return 0.05
    try:
        after = float(r.headers.get("retry-after", "1"))
    except ValueError:
        after = 1.0
    return max(0.0, after) + random.uniform(0, 0.25)


async def load(url: str, texts: list[str], clients: int, per_request: int, duration: float, server: Server,
               retry: str = "honour", headers: dict | None = None) -> dict:
    """C clients in closed loops for `duration` seconds (after a 429, each waits as ``retry`` says:
    see :func:`retry_delay`); returns the run's figures.

    Only requests answered within the window count. At its end the clients hang up: the server drops
    their queued work, and the next run starts once its queue is empty.
    """
    lat: list[float] = []
    statuses: dict[int, int] = {}
    tokens = 0
    errors = 0
    kinds: dict[str, int] = {}  # what the errors were
    in_flight = 0
    rss: list[float] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def sample_rss():
        while True:
            rss.append(server.rss_mb())
            await asyncio.sleep(0.25)

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as c:
        async def client(k: int):
            nonlocal tokens, errors, in_flight
            i = k * 7919
            while True:
                batch = [texts[(i + j) % len(texts)] for j in range(per_request)]
                i += per_request
                t0 = time.perf_counter()
                in_flight += 1
                try:
                    r = await c.post("/v1/embeddings", json={"model": "bench", "input": batch,
                                                            "input_type": "passage", "encoding_format": "base64"})
                except httpx.HTTPError as e:
                    errors += 1
                    kinds[type(e).__name__] = kinds.get(type(e).__name__, 0) + 1
                    continue
                finally:
                    in_flight -= 1
                dt = time.perf_counter() - t0
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    lat.append(dt)
                    tokens += r.json()["usage"]["total_tokens"]
                elif r.status_code == 429:
                    await asyncio.sleep(retry_delay(r, retry))
                else:
                    errors += 1
                    kinds[f"HTTP {r.status_code}"] = kinds.get(f"HTTP {r.status_code}", 0) + 1

        tasks = [asyncio.create_task(sample_rss())] + [asyncio.create_task(client(k)) for k in range(clients)]
        await asyncio.sleep(duration)
        unanswered = in_flight
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    await _wait_idle(url, headers=headers)
    lat.sort()
    ok = statuses.get(200, 0)
    return {
        "clients": clients, "texts_per_request": per_request, "seconds": duration,
        "requests_ok": ok, "req_per_s": ok / duration, "tokens_per_s": tokens / duration,
        "p50_ms": 1000 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "errors": errors, "error_kinds": kinds, "status_429": statuses.get(429, 0), "unanswered_at_end": unanswered,
        "rss_start_mb": rss[0] if rss else float("nan"), "rss_end_mb": rss[-1] if rss else float("nan"),
        "rss_peak_mb": max(rss) if rss else float("nan"),
        "rss_quartiles_mb": [rss[min(len(rss) - 1, int(q * (len(rss) - 1)))] for q in (0, .25, .5, .75, 1)] if rss else [],
    }


async def _wait_idle(url: str, timeout: float = 120, headers: dict | None = None) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=headers) as c:
        while time.monotonic() < deadline:
            text = (await c.get("/metrics")).text
            queued = sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                         if s.name == "e5kit_queue_tokens")
            if queued == 0:
                return
            await asyncio.sleep(0.2)


class OfflineEngine:
    """The engine alone on the same texts: E5.encode_passages with batch 32 (the library default)."""

    def __init__(self, model: Path, texts: list[str], dtype: str | None = None, backend: str = "auto"):
        from e5kit import E5

        self.m = E5(str(model), dtype=dtype, backend=backend)
        self.formatted = self.m.format(texts, "passage")
        self.n_tokens = sum(len(x) for x in self.m.tokenize(self.formatted))
        self.m.encode(self.formatted[:32])  # warm-up

    def tokens_per_s(self, seconds: float) -> float:
        t0 = time.perf_counter()
        rounds = 0
        while rounds == 0 or time.perf_counter() - t0 < seconds:
            self.m.encode(self.formatted, batch_size=32)
            rounds += 1
        return rounds * self.n_tokens / (time.perf_counter() - t0)


def health_probe(model: Path, src: Path, logdir: Path, seconds: float = 30.0) -> dict:
    """/health latency while 4 clients send /tokenize requests of 1,200 ~5 KB texts (~6 MB) in a loop."""
    import threading

    words = "the cell study of gene and cancer risk in patients protein women summit define".split()
    text = " ".join(words[i % len(words)] for i in range(700))
    body = json.dumps({"inputs": [f"{i} {text}" for i in range(1200)]}).encode()
    server = Server(model, ["--threads", "1"], logdir / "bench_server_health.log", src=src)
    stop = threading.Event()
    statuses: dict[int, int] = {}

    def attack():
        with httpx.Client(base_url=server.url, timeout=600) as c:
            while not stop.is_set():
                r = c.post("/tokenize", content=body, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(4)]
    lat, rss = [], []
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for t in threads:
                t.start()
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                c.get("/health")
                lat.append(time.perf_counter() - t0)
                rss.append(server.rss_mb())
                time.sleep(0.02)
        stop.set()  # the attack threads are daemons: requests still running end with the server
    finally:
        server.stop()
    lat.sort()
    return {"src": str(src), "probes": len(lat), "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))], "max_ms": 1000 * lat[-1],
            "tokenize_statuses": statuses, "rss_peak_mb": max(rss)}


def fmt_row(r: dict) -> str:
    return (f"| {r['clients']:>3} | {r['texts_per_request']:>2} | {r['req_per_s']:8.1f} | {r['tokens_per_s']:8.0f} | "
            f"{r['p50_ms']:8.0f} | {r['p99_ms']:8.0f} | {r['errors']:>3} | {r['status_429']:>5} | "
            f"{r['unanswered_at_end']:>3} | "
            f"{r['rss_peak_mb']:6.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: random e5-small-v2 shape)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per load run")
    ap.add_argument("--clients", default="1,16,64", help="concurrency levels")
    ap.add_argument("--sizes", default="1,32", help="texts per request")
    ap.add_argument("--n-texts", type=int, default=1024, help="SciFact passages to cycle through")
    ap.add_argument("--offline-texts", type=int, default=256, help="passages for the offline engine run")
    ap.add_argument("--overload-clients", type=int, default=512, help="0: no overload run")
    ap.add_argument("--overload-duration", type=float, default=60.0)
    ap.add_argument("--overload-size", type=int, default=4, help="longest passages per overload request")
    ap.add_argument("--max-queue-wait", type=float, default=5.0, help="--max-queue-wait of the overload server")
    ap.add_argument("--retry", choices=RETRY_POLICIES, default="honour",
                    help="after a 429: wait Retry-After + jitter (honour, as the openai client) or 50 ms (hostile)")
    ap.add_argument("--health-probe", action="store_true", help="also measure /health under a /tokenize attack")
    ap.add_argument("--src", type=Path, default=ROOT / "src", help="src/ the servers run (e.g. an older commit's worktree)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--dtype", default=None, help="--dtype for the server and the offline engine (e.g. bfloat16)")
    ap.add_argument("--backend", default="auto", help="--backend for the server and the offline engine")
    args = ap.parse_args()
    model_args = ["--backend", args.backend] + (["--dtype", args.dtype] if args.dtype else [])
    warnings.simplefilter("ignore")  # truncation warnings from the offline run

    model = args.model or build_random_e5_small(Path.home() / ".cache" / "e5kit-bench" / "e5-small-v2-random")
    texts = scifact_passages(args.n_texts)
    logdir = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"model {model}; {len(texts)} SciFact passages; {args.duration:.0f} s per run; {os.cpu_count()} CPUs",
          flush=True)

    # The engine offline is measured right before and right after the single-text runs (the machine
    # is shared, so the ratio uses both), with the server up but idle.
    offline_s = max(10.0, args.duration / 2)
    engine = OfflineEngine(model, texts[:args.offline_texts], args.dtype, args.backend)
    runs, offline, ov, probe = [], [], None, None
    header = ("| clients | texts/req | req/s | tokens/s | p50 ms | p99 ms | errors | 429s | unanswered at end | peak RSS MB |\n"
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    clients_list = [int(c) for c in args.clients.split(",") if c]
    if clients_list:
        server = Server(model, model_args, logdir / "bench_server.log", args.src)
        try:
            for k, size in enumerate(int(s) for s in args.sizes.split(",")):
                if k == 0:
                    offline.append(engine.tokens_per_s(offline_s))
                    print(f"engine offline (before): {offline[-1]:.0f} tokens/s", flush=True)
                    print(header, flush=True)
                for clients in clients_list:
                    r = asyncio.run(load(server.url, texts, clients, size, args.duration, server, args.retry))
                    runs.append(r)
                    print(fmt_row(r), flush=True)
                if k == 0:
                    offline.append(engine.tokens_per_s(offline_s))
                    print(f"engine offline (after): {offline[-1]:.0f} tokens/s", flush=True)
            server_hwm = server.peak_rss_mb()
        finally:
            code = server.stop()
        print(f"server peak RSS (VmHWM) {server_hwm:.0f} MB; exit code after SIGTERM {code}", flush=True)
        ref = sum(offline) / len(offline)
        print(f"engine offline: {ref:.0f} tokens/s (mean of {', '.join(f'{x:.0f}' for x in offline)}; "
              f"E5.encode_passages, batch 32, {args.offline_texts} passages, {engine.n_tokens} tokens)", flush=True)
        top = max(clients_list)
        for r in runs:
            if r["texts_per_request"] == 1 and r["clients"] == top:
                print(f"server at {top} single-text clients: {r['tokens_per_s']:.0f} tokens/s = "
                      f"{r['tokens_per_s'] / ref:.0%} of the engine offline (range "
                      f"{r['tokens_per_s'] / max(offline):.0%}..{r['tokens_per_s'] / min(offline):.0%}; target >= 80%), "
                      f"errors {r['errors']}", flush=True)

    if args.overload_clients:
        # Overload: many clients of long texts, each retrying after a 429 as --retry says.
        long_texts = sorted(texts, key=len, reverse=True)[:256]
        long_engine = OfflineEngine(model, long_texts, args.dtype, args.backend)
        before = long_engine.tokens_per_s(offline_s)
        ov_server = Server(model, [*model_args, "--max-queue-wait", str(args.max_queue_wait)],
                           logdir / "bench_server_overload.log", args.src)
        try:
            ov = asyncio.run(load(ov_server.url, long_texts, args.overload_clients, args.overload_size,
                                  args.overload_duration, ov_server, args.retry))
            ov_hwm = ov_server.peak_rss_mb()
        finally:
            ov_code = ov_server.stop()
        after = long_engine.tokens_per_s(offline_s)
        ov["offline_tokens_per_s"] = [before, after]
        answered = ov["requests_ok"] + ov["status_429"]
        print(f"overload ({args.overload_clients} clients x {args.overload_size} long texts, {args.overload_duration:.0f} s, "
              f"--max-queue-wait {args.max_queue_wait}, --retry {args.retry}): {ov['requests_ok']} ok, "
              f"{ov['status_429']} answered 429 "
              f"({ov['status_429'] / max(1, answered):.0%} of answers), {ov['errors']} other errors "
              f"{ov['error_kinds']}; admitted p50 "
              f"{ov['p50_ms']:.0f} ms p99 {ov['p99_ms']:.0f} ms (target p99 <= {2000 * args.max_queue_wait:.0f} ms); "
              f"{ov['tokens_per_s']:.0f} tokens/s = {ov['tokens_per_s'] / ((before + after) / 2):.0%} of the engine "
              f"offline on the same texts ({before:.0f} / {after:.0f} before / after); RSS at 0/25/50/75/100% "
              f"{' / '.join(f'{x:.0f}' for x in ov['rss_quartiles_mb'])} MB (VmHWM {ov_hwm:.0f} MB); "
              f"exit code {ov_code}", flush=True)

    if args.health_probe:
        probe = health_probe(model, args.src, logdir)
        print(f"/health under a 4-client /tokenize attack ({probe['src']}): {probe['probes']} probes, p50 "
              f"{probe['p50_ms']:.1f} ms, p99 {probe['p99_ms']:.1f} ms, max {probe['max_ms']:.1f} ms; /tokenize "
              f"statuses {probe['tokenize_statuses']}; server RSS peak {probe['rss_peak_mb']:.0f} MB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "offline_tokens_per_s": offline, "overload": ov,
                                         "health_probe": probe}, indent=2))


if __name__ == "__main__":
    main()
