"""The event loop stays free: /health answers within 100 ms while large /tokenize requests are
being worked on (a real `e5kit serve` process); large token-id bodies are parsed off the loop; a
/tokenize backlog has its own bounded pool and never holds up embedding (in-process)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx

from e5kit import E5
from server_helpers import ServerProcess

WORDS = "the cell study of gene and cancer risk in patients protein women summit define".split()


# The prober runs in a process of its own: in this one it would share the interpreter with the
# client threads, and their parsing of large responses would count as the server's latency.
PROBER = """
import json, os, sys, time
import httpx
url, stop = sys.argv[1], sys.argv[2]
lat = []
with httpx.Client(base_url=url, timeout=10) as c:
    c.get("/health")
    print("ready", flush=True)
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        status = c.get("/health").status_code
        lat.append(time.perf_counter() - t0 if status == 200 else float(status))
        time.sleep(0.01)
print(json.dumps(lat), flush=True)
"""


def _probe_while(server, jobs, tmp_path) -> list[float]:
    """/health latencies (s) while ``jobs`` (threads) run, probed from another process."""
    stop = tmp_path / f"stop-{time.monotonic_ns()}"
    prober = subprocess.Popen([sys.executable, "-c", PROBER, server.url, str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline().strip() == "ready"
        for t in jobs:
            t.start()
        for t in jobs:
            t.join(300)
        stop.touch()
        out, _ = prober.communicate(timeout=30)
    finally:
        prober.kill()
    lat = json.loads(out)
    assert all(x < 10 for x in lat), "a /health probe did not answer 200"
    return sorted(lat)


def test_health_stays_fast_under_big_requests(tiny_bert, tmp_path):
    # A 30 s wait bound: the 1M-token request below (seconds of work) is admitted (alone it may take up to 60 s).
    server = ServerProcess(["-m", f"t={tiny_bert}", "--max-response-bytes", "8000000", "--max-queue-wait", "30"],
                           tmp_path / "server.log")
    text = " ".join(WORDS[i % len(WORDS)] for i in range(700))  # ~5 KB, over 512 tokens
    big = json.dumps({"inputs": [f"{i} {text}" for i in range(1200)]}).encode()  # ~6 MB
    small = json.dumps({"inputs": [f"{i} {text}" for i in range(20)]}).encode()
    cls, sep = E5(str(tiny_bert)).prepare([""]).ids[0]  # the model's own ids: [CLS] ... [SEP]
    ids = json.dumps({"input": [[cls] + [5 + (i % 50)] * 510 + [sep] for i in range(2000)]}).encode()  # ~3 MB of ids
    results: dict[str, list] = {"big": [], "ids": [], "small": []}

    def send(kind, path, body, n):
        def go():
            with httpx.Client(base_url=server.url, timeout=300) as c:
                for _ in range(n):
                    r = c.post(path, content=body, headers={"content-type": "application/json"})
                    results[kind].append((r.status_code, r.json()))
        return threading.Thread(target=go)

    try:
        lat = _probe_while(server, [send("big", "/tokenize", big, 1), send("big", "/tokenize", big, 1),
                                    send("small", "/tokenize", small, 3)], tmp_path)
        # The big answers would pass the 8 MB response cap: 413 (or 429 while the pool is full).
        for status, body in results["big"]:
            assert status in (413, 429), (status, body)
        assert any(s == 413 and b["error"]["code"] == "response_too_large" for s, b in results["big"])
        assert all(s == 200 and len(b["data"]) == 20 for s, b in results["small"]), results["small"]
        p95, p99 = lat[int(len(lat) * 0.95)], lat[int(len(lat) * 0.99)]
        print(f"/health during /tokenize attack: {len(lat)} probes, p95 {p95 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
              f"max {lat[-1] * 1000:.1f} ms")
        # Within 100 ms for 95% of probes; the slowest also wait for the OS scheduler on a machine
        # shared with other jobs (quiet-machine figures: BENCHMARKS.md), hence the looser bound on the max.
        assert len(lat) >= 10 and p95 < 0.1 and lat[-1] < 1.0, lat[-5:]
        # A large token-id body: parsed and checked in the pool. json.loads itself holds the
        # interpreter for its duration, so the bound here is looser (measured in BENCHMARKS.md).
        lat = _probe_while(server, [send("ids", "/v1/embeddings", ids, 1)], tmp_path)
        assert [s for s, _ in results["ids"]] == [200]
        print(f"/health during a 3 MB token-id request: {len(lat)} probes, max {lat[-1] * 1000:.1f} ms")
        assert lat[-1] < 1.0, lat[-5:]
        # The largest body the server takes (16 MiB): one input of 8M token ids (cut to 512).
        results["ids"].clear()
        huge = ('{"input": [' + str(cls) + ",5" * (8_000_000 - 2) + f",{sep}]}}").encode()
        assert len(huge) <= 16 << 20
        lat = _probe_while(server, [send("ids", "/v1/embeddings", huge, 1)], tmp_path)
        assert [(s, b["usage"]["total_tokens"]) for s, b in results["ids"]] == [(200, 512)]
        print(f"/health during a 16 MB token-id request: {len(lat)} probes, max {lat[-1] * 1000:.1f} ms")
        assert lat[-1] < 1.0, lat[-5:]
    finally:
        server.stop()


def test_a_tokenize_backlog_does_not_hold_up_embedding(tiny_server):
    """/tokenize parses, tokenizes and renders in its own pool with a bounded backlog: while that pool is
    busy, large embedding requests (parsed and tokenized in the other pool) are answered, and /tokenize
    beyond its backlog gets 429 + Retry-After."""
    service = tiny_server.service
    pool = service.tokenize_pool
    text = " ".join(WORDS[i % len(WORDS)] for i in range(6000))  # ~40 KB
    tok_body = json.dumps({"model": "tiny", "inputs": [f"{i} {text}" for i in range(20)]}).encode()  # ~0.8 MB
    emb_body = json.dumps({"model": "tiny", "input": [f"{i} {text[:1500]}" for i in range(200)]}).encode()
    assert len(emb_body) > 256 << 10 and 2 * len(tok_body) <= pool.limit < 3 * len(tok_body)
    headers = {**tiny_server.headers, "content-type": "application/json"}
    release = threading.Event()
    pool.executor.submit(release.wait, 60)  # the pool's one thread is busy: /tokenize work queues up

    async def scenario():
        async with tiny_server.async_client(headers=headers) as c:
            queued = [asyncio.create_task(c.post("/tokenize", content=tok_body)) for _ in range(2)]
            while pool.cost < 2 * len(tok_body):
                await asyncio.sleep(0.01)
            over = await c.post("/tokenize", content=tok_body)
            embedded = await asyncio.wait_for(c.post("/v1/embeddings", content=emb_body), 60)
            release.set()
            return over, embedded, await asyncio.gather(*queued)

    try:
        over, embedded, queued = tiny_server.run(scenario())
    finally:
        release.set()
    assert embedded.status_code == 200 and len(embedded.json()["data"]) == 200, embedded.text
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1, over.text
    assert over.json()["error"]["code"] == "queue_full"
    for r in queued:
        assert r.status_code == 200 and len(r.json()["data"]) == 20, r.text
