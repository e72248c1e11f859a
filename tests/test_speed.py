"""Backends, threads and CPU batch planning (issue 5), on tiny random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import e5kit.engine
from e5kit import E5
from e5kit.engine import plan_batches
from e5kit.encoder import bucket_rows, embed_batch
from e5kit.loading import load_encoder
from e5kit.quant import ONEDNN_MIN_ROWS, Int8Linear, Int8QualityError, amx_supported, int8_plan, quantize_linears
from helpers import PARITY_TEXTS, reference_embed

pytestmark = pytest.mark.filterwarnings("ignore::e5kit.api.TruncationWarning")

SRC = str(Path(__file__).resolve().parents[1] / "src")
TEXTS = [t for t in PARITY_TEXTS if t] + [f"passage: gene {i} " + "cell " * (i * 7) for i in range(20)]


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_auto_is_the_exact_torch_path(tiny_bert):
    model = E5(str(tiny_bert))
    assert model.backend == "torch" and model.dtype == torch.float32
    ref = reference_embed(tiny_bert, TEXTS)
    assert np.abs(model.encode(TEXTS) - ref).max() <= 1e-5
    assert np.array_equal(E5(str(tiny_bert), backend="torch").encode(TEXTS), model.encode(TEXTS))


def test_cpu_token_budget_caps_batches_and_keeps_parity(tiny_bert):
    model = E5(str(tiny_bert))
    engine = model.engine
    cap = engine.cpu_batch_tokens
    assert 512 <= cap <= 8192
    # the budget the engine plans with on CPU: never more than cap tokens (count x longest) per batch
    ids = engine.tokenize(TEXTS * 20).ids
    for b in plan_batches([len(s) for s in ids], 1000, min(16384, cap)):
        assert len(b) == 1 or len(b) * max(len(ids[i]) for i in b) <= cap
    ref = reference_embed(tiny_bert, TEXTS * 20)
    out = model.encode(TEXTS * 20, batch_size=1000, max_batch_tokens=16384)
    assert np.abs(out - ref).max() <= 1e-5


@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_xlmr"])
def test_int8_close_to_fp32_and_uses_int8_linears(kind, request):
    path = request.getfixturevalue(kind)
    fp32 = E5(str(path)).encode(TEXTS)
    model = E5(str(path), backend="int8")
    assert model.backend == "int8" and model.engine.int8_min_cosine >= 0.99
    plan, n_layers = int8_plan(), model.engine.config.num_layers
    assert plan.kernel == ("onednn" if amx_supported() else "fbgemm") and model.engine.dtype == plan.dtype
    int8 = {n: m for n, m in model.engine.model.named_modules() if isinstance(m, Int8Linear)}
    assert len(int8) == len(plan.layers) * n_layers and {n.rsplit(".", 1)[-1] for n in int8} == set(plan.layers)
    assert all(m.kernel == plan.kernel for m in int8.values())
    assert sum(m.inv_smooth is not None for m in int8.values()) == len(plan.smoothed) * n_layers
    out = model.encode(TEXTS)
    assert out.shape == fp32.shape and out.dtype == np.float32
    assert (out * fp32).sum(1).min() >= 0.99
    assert np.abs(out - fp32).max() > 0  # really a different (quantized) computation
    # per-text results do not depend on batching
    one = np.stack([model.encode([t])[0] for t in TEXTS[:5]])
    assert (one * out[:5]).sum(1).min() >= 0.999


@pytest.mark.parametrize("kernel", ["fbgemm", "onednn"])
def test_int8_kernels_match_fp32(kernel, tiny_xlmr):
    """Each int8 kernel (not only the one this CPU's plan picks) against fp32 on the same weights;
    the fp32 model is left untouched by the conversion (its weights are shared, not cast)."""
    if kernel == "onednn" and not amx_supported():
        pytest.skip("oneDNN's AMX int8 kernel needs a CPU with AMX (Sapphire Rapids or later)")
    engine = E5(str(tiny_xlmr)).engine
    ids = engine.tokenize(TEXTS).ids
    model = load_encoder(engine.checkpoint.path, engine.config).eval()  # the engine's own is packed
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = engine.forward(ids)
    plan = int8_plan(kernel)
    int8 = quantize_linears(model, calibrate=lambda m: embed_batch(m, ids, "cpu"), plan=plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert {p.dtype for p in int8.parameters()} == {plan.dtype}
    with torch.inference_mode():
        out = embed_batch(int8, ids, "cpu")
    cos = (out * fp32).sum(-1)
    assert out.dtype == torch.float32 and cos.min() >= 0.99 and not torch.equal(out, fp32)
    # a text's vector does not depend on its batch (dynamic ranges are per batch, so close, not equal);
    # alone, its few rows take oneDNN's small-call route through fbgemm
    assert len(ids[0]) < ONEDNN_MIN_ROWS < sum(map(len, ids))
    with torch.inference_mode():
        alone = embed_batch(int8, ids[:1], "cpu")
    assert float((alone[0] * out[0]).sum()) >= 0.999


def test_int8_quality_guard_refuses(tiny_bert, monkeypatch):
    monkeypatch.setattr(e5kit.engine, "MIN_COSINE", 1.0 + 1e-3)  # no int8 model can reach this
    with pytest.raises(Int8QualityError, match="not accurate enough.*backend='torch'"):
        E5(str(tiny_bert), backend="int8")


@pytest.mark.parametrize("kwargs,match", [
    (dict(backend="onnx"), "backend must be one of"),
    (dict(backend="int8", dtype="bfloat16"), "int8 backend computes in int8"),
    (dict(backend="int8", device="cuda", dtype="float32"), "CPU only"),
    (dict(threads=-1), "threads must be a positive integer"),
])
def test_backend_errors(tiny_bert, kwargs, match):
    with pytest.raises(ValueError, match=match):
        E5(str(tiny_bert), **kwargs)


def test_threads_argument(tiny_bert, keep_threads):
    E5(str(tiny_bert), threads=1)
    assert torch.get_num_threads() == 1
    E5(str(tiny_bert))  # no argument: torch's process-wide setting is the caller's, left as it is
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize("omp", ["1", None])
def test_omp_num_threads_respected(tiny_bert, omp):
    """The library keeps torch's own thread count (which honours OMP_NUM_THREADS); a command line
    entry point sets its default: OMP_NUM_THREADS, else every core the process may run on."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if omp:
        env["OMP_NUM_THREADS"] = omp
    env["PYTHONPATH"] = SRC
    code = (f"import os, torch; from e5kit import E5; from e5kit.cli import load_model; before = torch.get_num_threads(); "
            f"E5({str(tiny_bert)!r}); lib = torch.get_num_threads(); "
            f"load_model({str(tiny_bert)!r}, None, None, 'auto', None); "
            "print(before, lib, torch.get_num_threads(), len(os.sched_getaffinity(0)))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, lib, cli, cores = map(int, out.stdout.split()[-4:])
    assert lib == before
    assert cli == (int(omp) if omp else cores)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "e5kit", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_backend_option(tiny_bert):
    out = _cli("embed", "-m", str(tiny_bert), "--backend", "int8", "--threads", "1", "how much protein", "summit")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line)["embedding"] for line in out.stdout.splitlines()]
    fp32 = E5(str(tiny_bert)).encode_queries(["how much protein", "summit"])
    assert (np.array(rows) * fp32).sum(1).min() >= 0.99
    bad = _cli("embed", "-m", str(tiny_bert), "--backend", "onnx", "x")
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("kernel", [None, "fbgemm"])
def test_bucketed_rows_do_not_change_vectors(kernel, tiny_xlmr):
    """On CPU the engine rounds a batch's row count up with copies of real tokens (so oneDNN reuses
    its per-shape kernels); neither fp32 nor int8 (whose dynamic ranges see every row) changes."""
    engine = E5(str(tiny_xlmr)).engine
    model = load_encoder(engine.checkpoint.path, engine.config).eval()
    if kernel:
        model = quantize_linears(model, plan=int8_plan(kernel))
    for seqs in (engine.tokenize(TEXTS).ids, [[0]], engine.tokenize(["summit define"]).ids):
        n = sum(map(len, seqs))
        assert bucket_rows(n) > n or n in (16, 32)
        with torch.inference_mode():
            plain = embed_batch(model, seqs, "cpu")
            bucketed = embed_batch(model, seqs, "cpu", bucket=True)
        assert (bucketed - plain).abs().max() <= 1e-5
