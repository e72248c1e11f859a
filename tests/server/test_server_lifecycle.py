"""Real `e5kit serve` processes: settings from E5KIT_* variables, the startup log, a SIGTERM drain
that loses nothing, a busy port, slow clients, redacted access logs; and (in-process) the drain limit."""

from __future__ import annotations

import asyncio
import signal
import socket
import time

import httpx
import numpy as np

from server_helpers import ServerProcess, metric
from helpers import make_tiny_model, run_e5kit

LONG = " ".join(["the cell study of gene and cancer risk in patients"] * 80)


def test_sigterm_drains_in_flight_requests(tmp_path):
    # A slower random model (4 layers, hidden 256) so 40 x 512 tokens take a few seconds.
    model = make_tiny_model(tmp_path / "m", "bert", layers=4, hidden=256, heads=4)
    key, alice = "sk-env-key", "sk-alice-from-file"
    (tmp_path / "keys.txt").write_text(f"# keys\nalice {alice}\n")
    server = ServerProcess([], tmp_path / "server.log", key=key, env={
        "E5KIT_MODEL": f"slow={model}", "E5KIT_API_KEY": key, "E5KIT_MAX_BATCH_TOKENS": "1024",
        "E5KIT_API_KEY_FILE": str(tmp_path / "keys.txt"),
        "E5KIT_DRAIN_TIMEOUT": "60", "E5KIT_MAX_QUEUE_WAIT": "60", "E5KIT_THREADS": "1", "E5KIT_MAX_WAIT_MS": "0"})
    try:
        log = server.log()
        for part in (f"model slow: {model}", "device cpu", "dtype float32", "max 512 tokens", "max_inputs=2048",
                     "max_batch_tokens=1024", "max_queue_wait=60.0", "2 API key(s)", "listening on"):
            assert part in log, (part, log)
        assert httpx.post(server.url + "/embed", json={"inputs": "a"},
                          headers={"Authorization": f"Bearer {alice}"}).status_code == 200  # the key file applies
        # A key in the query string is refused and never written to the access log.
        assert httpx.post(server.url + f"/embed?api_key={key}&x=1", json={"inputs": "a"}).status_code == 401
        log = server.log()
        assert "api_key=REDACTED&x=1" in log, log
        assert key not in log and alice not in log
        assert httpx.post(server.url + "/embed", json={"inputs": "a"}).status_code == 401  # E5KIT_API_KEY applies
        n = 40
        texts = [f"{i} {LONG}" for i in range(n)]

        async def run():
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as c:
                single = (await c.post("/v1/embeddings", json={"input": texts[0], "model": "slow"})).json()
                tasks = [asyncio.create_task(c.post("/v1/embeddings", json={"input": t, "model": "slow"}))
                         for t in texts]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # every request has reached the queue
                    m = (await c.get("/metrics")).text
                    admitted = metric(m, "e5kit_queue_tokens", model="slow") + metric(
                        m, "e5kit_model_tokens_total", model="slow")
                    if admitted >= (n + 1) * 512:
                        break
                    await asyncio.sleep(0.05)
                queued = metric(m, "e5kit_queue_inputs", model="slow")
                server.proc.send_signal(signal.SIGTERM)
                results = await asyncio.gather(*tasks, return_exceptions=True)
                return single, queued, results

        single, queued, results = asyncio.run(run())
        assert queued > 0, "SIGTERM should arrive while requests are still queued"
        for r in results:
            assert isinstance(r, httpx.Response) and r.status_code == 200, r
            assert r.json()["usage"]["total_tokens"] == 512
        np.testing.assert_allclose(results[0].json()["data"][0]["embedding"], single["data"][0]["embedding"],
                                   atol=1e-5)
        assert server.proc.wait(60) == 0
        assert "drained" in server.log()
    finally:
        server.stop()


def test_sigterm_with_more_work_than_the_drain(tmp_path):
    """64 clients x 4 long texts, SIGTERM, a 2 s drain: every answer is a 200, a 429 (admission) or an
    OpenAI-shaped 503 with Retry-After (drain ran out); never uvicorn's plain-text 500."""
    model = make_tiny_model(tmp_path / "m", "bert", layers=4, hidden=256, heads=4)
    server = ServerProcess(["-m", f"slow={model}", "--drain-timeout", "2", "--max-queue-wait", "2", "--threads", "1",
                            "--max-batch-tokens", "1024"], tmp_path / "server.log")
    texts = [f"{i} {LONG}" for i in range(4)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tasks = [asyncio.create_task(c.post("/v1/embeddings", json={"input": texts})) for _ in range(64)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # every request has been admitted or refused
                m = (await c.get("/metrics")).text
                admitted = (metric(m, "e5kit_queue_tokens", model="slow")
                            + metric(m, "e5kit_model_tokens_total", model="slow")) // 2048
                if admitted + metric(m, "e5kit_rejected_requests_total", model="slow") >= 64:
                    break
                await asyncio.sleep(0.05)
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        results = asyncio.run(run())
        counts: dict = {}
        for r in results:
            assert isinstance(r, httpx.Response), r
            counts[r.status_code] = counts.get(r.status_code, 0) + 1
            assert r.status_code in (200, 429, 503), (r.status_code, r.text)
            if r.status_code != 200:
                assert r.json()["error"]["type"] in ("rate_limit_error", "server_error")
                assert int(r.headers["retry-after"]) >= 1
        print("SIGTERM status counts:", counts)
        assert counts.get(200, 0) >= 1
        assert server.proc.wait(60) == 0
        assert "Traceback" not in server.log()
    finally:
        server.stop()


def test_bad_settings_fail_fast(tmp_path, tiny_bert):
    """Bad settings and a busy port fail before any model is loaded, with one clear line."""
    r = run_e5kit("serve", "-m", str(tmp_path / "missing"), clean_env=True, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = run_e5kit("serve", "-m", str(tiny_bert), "--max-batch-tokens", "100", clean_env=True, timeout=60)
    assert r.returncode != 0 and "max_batch_tokens" in r.stderr
    (tmp_path / "keys").write_text("a b c\n")
    r = run_e5kit("serve", "-m", str(tiny_bert), "--api-key-file", str(tmp_path / "keys"), clean_env=True, timeout=60)
    assert r.returncode != 0 and "expected 'KEY' or 'LABEL KEY'" in r.stderr
    r = run_e5kit("serve", "-m", str(tiny_bert), "--drain-timeout", "1", "--max-queue-wait", "5", clean_env=True,
                  timeout=60)
    assert r.returncode != 0 and "drain_timeout" in r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_e5kit("serve", "-m", str(tmp_path / "not-loaded"), "--port", str(port), "--log-level", "info",
                      clean_env=True, timeout=60)
    # The port is checked first: the model path (which does not exist) is never reached.
    assert r.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in r.stderr, r.stderr
    assert "does not exist" not in r.stderr and "listening" not in r.stderr and "Traceback" not in r.stderr


def test_slow_clients_are_cut_off(tiny_bert, tmp_path):
    """Slowloris: connections that do not finish their request head within --request-timeout are
    closed; a body that trickles in gets 408; the server keeps answering meanwhile."""
    server = ServerProcess(["-m", f"t={tiny_bert}", "--request-timeout", "1", "--max-connections", "200"],
                           tmp_path / "server.log")
    try:
        socks = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            socks.append(s)
        body = socket.create_connection(("127.0.0.1", server.port))
        body.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"inputs\": ")
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        closed = 0
        for s in socks:
            s.settimeout(10)
            try:
                closed += s.recv(1) == b""  # the server closed it
            except (ConnectionResetError, TimeoutError):
                closed += 1
        assert closed == 50 and time.monotonic() - t0 < 10
        body.settimeout(10)
        head = body.recv(4096)
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"request_timeout" in head or b"did not arrive" in head + body.recv(4096)
        for s in [*socks, body]:
            s.close()
        assert httpx.post(server.url + "/v1/embeddings", json={"input": "fine"}).status_code == 200
    finally:
        server.stop()
