"""Two processes (torchrun, gloo) x batch B train exactly like one process x batch 2B."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_python
from test_train import write_data

pytestmark = pytest.mark.slow  # torchrun and 160-step runs: ~20 s on a 2-core machine

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(nproc: int, cfg: Path, out: Path, batch: int, extra: list[str]) -> list[dict]:
    r = run_python("-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                   f"--master_port={_free_port()}", "-m", "e5kit", "train", str(cfg), "--output-dir", str(out),
                   "--batch-size", str(batch), *extra, env={"OMP_NUM_THREADS": "1"}, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_double_batch(tiny_bert, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 24, negatives=2, seed=11)
    cfg = tmp_path / "run.yaml"
    # dropout off: masks are drawn per process, so only then can the two layouts agree exactly
    cfg.write_text(f"data: {data}\nmodel: {tiny_bert}\nnegatives: 2\nepochs: 2\nlr: 1.0e-4\nwarmup_steps: 1\n"
                   f"dropout: 0.0\nthreads: 1\nprogress: false\nchunk_size: 3\nquery_max_length: 32\n"
                   f"passage_max_length: 48\n")
    one = _run(1, cfg, tmp_path / "one", 8, [])
    two = _run(2, cfg, tmp_path / "two", 4, [])
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"]), (a, b)
    assert one[-1]["loss"] < one[0]["loss"]
    w1, w2 = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    w0 = load_file(str(Path(tiny_bert) / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)
    assert max((w1[k] - w0[k]).abs().max().item() for k in w1) > 1e-4  # training moved the weights
    # without gathering, each process sees only its own negatives: a different (smaller-batch) loss
    two_local = _run(2, cfg, tmp_path / "two-local", 4, ["--no-gather", "--max-steps", "1"])
    assert abs(two_local[0]["loss"] - one[0]["loss"]) > 1e-3


def test_ctrl_c_stops_with_a_checkpoint_and_resume_matches_uninterrupted(tiny_bert, tmp_path):
    import signal
    import time

    from e5kit.train import TrainConfig, train

    data = write_data(tmp_path / "d.jsonl", 16, negatives=1, seed=2)
    opts = dict(data=str(data), model=str(tiny_bert), batch_size=4, negatives=1, epochs=40, lr=1e-4, threads=1,
                progress=False, query_max_length=32, passage_max_length=32)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")  # Popen, not run_python: it is interrupted
    cmd = [sys.executable, "-m", "e5kit", "train", "--output-dir", str(out)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag if v is not False else "--no-" + k.replace("_", "-")] + ([] if isinstance(v, bool) else [str(v)])
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 130, log
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and not (out / "model.safetensors").exists(), log
    stopped = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped < 160
    resumed = train(TrainConfig(**opts, output_dir=str(out), resume="auto"))
    assert resumed.steps == 160 and resumed.history[0]["step"] == stopped + 1
    full = train(TrainConfig(**opts, output_dir=str(tmp_path / "full")))
    steps = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 161))  # one log across the stop
    for a, b in zip(full.history, steps):
        assert abs(a["loss"] - b["loss"]) < 1e-6, (a, b)
    w1, w2 = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0, msg=k)
