"""Settings from E5KIT_* variables, the startup log, and a SIGTERM drain that loses nothing."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import numpy as np

from server_helpers import ServerProcess, metric
from helpers import make_tiny_model

LONG = " ".join(["the cell study of gene and cancer risk in patients"] * 80)


def test_sigterm_drains_in_flight_requests(tmp_path):
    # A slower random model (4 layers, hidden 256) so 40 x 512 tokens take a few seconds.
    model = make_tiny_model(tmp_path / "m", "bert", layers=4, hidden=256, heads=4)
    key = "sk-env-key"
    server = ServerProcess([], tmp_path / "server.log", key=key, env={
        "E5KIT_MODEL": f"slow={model}", "E5KIT_API_KEY": key, "E5KIT_MAX_BATCH_TOKENS": "1024",
        "E5KIT_DRAIN_TIMEOUT": "60", "E5KIT_THREADS": "1", "E5KIT_MAX_WAIT_MS": "0"})
    try:
        log = server.log()
        for part in (f"model slow: {model}", "device cpu", "dtype float32", "max 512 tokens", "max_inputs=2048",
                     "max_batch_tokens=1024", "1 API key(s)", "listening on"):
            assert part in log, (part, log)
        assert key not in log
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


def test_bad_settings_fail_fast(tmp_path, tiny_bert):
    import subprocess
    import sys

    from server_helpers import SRC

    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "e5kit", "serve", "-m", str(tmp_path / "missing")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "e5kit", "serve", "-m", str(tiny_bert), "--max-batch-tokens", "100"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "max_batch_tokens" in r.stderr
    (tmp_path / "keys").write_text("a b c\n")
    r = subprocess.run([sys.executable, "-m", "e5kit", "serve", "-m", str(tiny_bert), "--api-key-file",
                        str(tmp_path / "keys")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "expected 'KEY' or 'LABEL KEY'" in r.stderr
