"""Loading from local directories and a Hugging Face cache, and every failure's message."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from e5kit import E5, E5LoadError
from e5kit.loading import load_checkpoint, write_metadata
from helpers import reference_embed, run_e5kit, run_python

TEXTS = ["query: how much protein should a female eat", "passage: the cell study", "a"]


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def make_hub_cache(cache, repo_id, model_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay a model out exactly as huggingface_hub's cache does (blobs, snapshots, refs)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in model_dir.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(f"../../blobs/blob-{f.name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return revision


def _run_offline(cache, code):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HOME": str(cache)}
    return run_python("-c", code, env=env, clean_env=True, timeout=120)


def test_load_from_hub_cache_offline(tiny_bert, tmp_path):
    cache = tmp_path / "hub"
    rev = make_hub_cache(cache, "intfloat/e5-small-v2", tiny_bert)
    code = (
        "import sys, numpy as np; sys.path[:0] = %r\n"
        "from e5kit import E5\n"
        "m = E5('intfloat/e5-small-v2')\n"
        "r = E5('intfloat/e5-small-v2', revision=%r)\n"
        "e = m.encode(%r); assert np.array_equal(e, r.encode(%r))\n"
        "np.save(%r, e); print(m.prompt_style, m.spec.languages)\n"
    ) % (sys.path, rev, TEXTS, TEXTS, str(tmp_path / "e.npy"))
    out = _run_offline(cache, code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["e5", "en"]  # registry metadata for the hub id
    assert np.abs(np.load(tmp_path / "e.npy") - reference_embed(tiny_bert, TEXTS)).max() <= 1e-5


def test_offline_cache_miss_is_one_clear_error(tmp_path):
    code = (
        "import sys; sys.path[:0] = %r\n"
        "from e5kit import E5, E5LoadError\n"
        "try:\n    E5('intfloat/e5-base-v2')\n"
        "except E5LoadError as e:\n    print(e)\n"
    ) % (sys.path,)
    out = _run_offline(tmp_path, code)
    assert out.returncode == 0, out.stderr
    assert "intfloat/e5-base-v2" in out.stdout and "not in the local Hugging Face cache" in out.stdout
    assert "HF_HUB_OFFLINE=1" in out.stdout
    # advice that works with today's huggingface_hub (it ships `hf`, not `huggingface-cli`)
    assert "`e5kit download intfloat/e5-base-v2`" in out.stdout and "`hf download intfloat/e5-base-v2`" in out.stdout
    assert "huggingface-cli" not in out.stdout


def test_pytorch_bin_and_sharded_safetensors(tiny_bert, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_bert / "model.safetensors"))
    ref = reference_embed(tiny_bert, TEXTS)
    d = _copy(tiny_bert, tmp_path, "bin")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    assert np.abs(E5(str(d)).encode(TEXTS) - ref).max() <= 1e-5

    d = _copy(tiny_bert, tmp_path, "sharded")
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(d / name))
    index = {"weight_map": {k: name for name, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert np.abs(E5(str(d)).encode(TEXTS) - ref).max() <= 1e-5


def test_prefixed_state_dict_keys(tiny_bert, tmp_path):
    """Checkpoints saved from BertForX carry a 'bert.' prefix and a pooler/head: both handled."""
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_bert, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd = {f"bert.{k}": v for k, v in sd.items()} | {"cls.predictions.bias": torch.zeros(3)}
    save_file(sd, str(d / "model.safetensors"))
    assert np.abs(E5(str(d)).encode(TEXTS) - reference_embed(tiny_bert, TEXTS)).max() <= 1e-5


def test_metadata_sets_prompt_style(tiny_xlmr, tmp_path):
    d = _copy(tiny_xlmr, tmp_path)
    assert E5(str(d)).prompt_style == "e5"
    write_metadata(d, "instruct", base_model="intfloat/multilingual-e5-large-instruct")
    m = E5(str(d))
    assert m.prompt_style == "instruct" and m.spec.languages.startswith("multilingual")
    assert m.format(["x"], "query", "SciFact")[0].startswith("Instruct: Given a scientific claim")
    assert E5(str(d), prompt_style="none").format(["x"], "query") == ["x"]  # caller wins


# ---- every failure gives one clear E5LoadError naming the file ---------------------------------

def _expect(d, *fragments):
    with pytest.raises(E5LoadError) as e:
        E5(str(d))
    msg = str(e.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_missing_directory(tmp_path):
    _expect(tmp_path / "nope", "does not exist")


def _with_config(src, tmp_path, **changes):
    d = _copy(src, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | changes))
    return d


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# (file to damage, what to do to it, fragments the error must contain)
DAMAGE = {
    "missing config": ("config.json", "unlink", ["config.json", "missing"]),
    "invalid config": ("config.json", lambda f: f.write_text("{not json"), ["config.json", "not valid JSON"]),
    "missing weights": ("model.safetensors", "unlink", ["no weights", "model.safetensors"]),
    "truncated safetensors": ("model.safetensors", _truncate, ["model.safetensors", "truncated or corrupt"]),
    "missing tokenizer": ("tokenizer.json", "unlink", ["tokenizer.json", "missing"]),
    "corrupt tokenizer": ("tokenizer.json", lambda f: f.write_text('{"version": "1.0"}'),
                          ["tokenizer.json", "could not be read"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_files(tiny_bert, tmp_path, case):
    name, action, fragments = DAMAGE[case]
    d = _copy(tiny_bert, tmp_path)
    f = d / name
    f.unlink() if action == "unlink" else action(f)
    _expect(d, *fragments)


def test_corrupt_pytorch_bin(tiny_bert, tmp_path):
    d = _copy(tiny_bert, tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x00garbage" * 100)
    _expect(d, "pytorch_model.bin", "truncated or corrupt")


def test_unknown_architecture(tiny_bert, tmp_path):
    _expect(_with_config(tiny_bert, tmp_path, model_type="gpt2"), "config.json", "'gpt2' is not supported")


def test_wrong_shapes(tiny_bert, tmp_path):
    _expect(_with_config(tiny_bert, tmp_path, intermediate_size=100), "do not match config.json", "shape")


def test_missing_layer_weights(tiny_bert, tmp_path):
    _expect(_with_config(tiny_bert, tmp_path, num_hidden_layers=3), "encoder.layer.2")


def test_file_instead_of_directory(tiny_bert):
    _expect(tiny_bert / "config.json", "is a file")


def test_checkpoint_spec_from_config(tiny_xlmr):
    ck = load_checkpoint(str(tiny_xlmr))
    assert ck.spec.architecture == "xlm-roberta" and ck.config.position_offset == 2
    assert ck.spec.max_tokens == 512 and ck.spec.hidden == 32


# ---- `e5kit download`, `e5kit models`, `e5kit info` without network ------------------------------

def _cli(cache, *args):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HOME": str(cache),
           "PYTHONPATH": os.pathsep.join(sys.path), "E5KIT_CACHE": str(cache / "e5kit")}
    return run_e5kit(*args, env=env, clean_env=True, timeout=120)


def test_download_arguments_and_offline_errors(tiny_bert, tmp_path):
    cache = tmp_path / "hub"
    rev = make_hub_cache(cache, "intfloat/e5-small-v2", tiny_bert)
    out = _cli(cache, "download")
    assert out.returncode == 2 and "Missing argument 'MODEL'" in out.stderr
    out = _cli(cache, "download", "intfloat/e5-base-v2", "--revision", "v1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "cannot download intfloat/e5-base-v2: HF_HUB_OFFLINE=1 is set" in out.stderr
    assert "copy the Hugging Face cache" in out.stderr
    out = _cli(cache, "download", "intfloat/e5-base-v2", "--dir", str(tmp_path / "d"))
    assert out.returncode == 1 and "HF_HUB_OFFLINE=1 is set" in out.stderr and not (tmp_path / "d").exists()
    (tmp_path / "f").write_text("x")
    out = _cli(cache, "download", "intfloat/e5-base-v2", "--dir", str(tmp_path / "f"))
    assert out.returncode == 2 and "is a file" in out.stderr
    out = _cli(cache, "download", str(tiny_bert))
    assert out.returncode == 1 and "is a local directory; there is nothing to download" in out.stderr
    # already cached: offline is fine, and the registry's short name resolves to the hub id
    out = _cli(cache, "download", "e5-small-v2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(cache / "models--intfloat--e5-small-v2" / "snapshots" / rev)


def test_models_and_info_say_where_each_loads_from(tiny_bert, tmp_path):
    cache = tmp_path / "hub"
    rev = make_hub_cache(cache, "intfloat/e5-small-v2", tiny_bert)
    out = _cli(cache, "models")
    assert out.returncode == 0, out.stderr
    status = {line.split()[0]: line.split("  ")[-1].strip() for line in out.stdout.splitlines()[2:] if line.strip()
              and not line.startswith("*")}
    assert status["intfloat/e5-small-v2"] == "cached" and status["intfloat/e5-base-v2"] == "needs download"
    # a registry id that is not cached: what the registry knows, and how to get it (exit 0, offline)
    out = _cli(cache, "info", "intfloat/multilingual-e5-base")
    assert out.returncode == 0, out.stderr
    assert "architecture       xlm-roberta" in out.stdout and "license            mit" in out.stdout
    assert ("loads from         download: not in the local Hugging Face cache; "
            "`e5kit download intfloat/multilingual-e5-base`") in out.stdout
    out = _cli(cache, "info", "intfloat/e5-small-v2")
    assert out.returncode == 0, out.stderr
    assert f"cached: {cache / 'models--intfloat--e5-small-v2' / 'snapshots' / rev}" in out.stdout
    assert "hidden             32" not in out.stdout  # registry facts for the id; config facts below
    assert "vocab_size" in out.stdout
    out = _cli(cache, "info", "someone/unknown-model")
    assert out.returncode == 1 and "`e5kit download someone/unknown-model`" in out.stderr


def test_local_copy_of_a_registry_model_gets_its_card(ml_e5):
    """A plain copy (no e5kit.json) is recognised by shape: languages and licence are not 'unknown'."""
    ck = load_checkpoint(str(ml_e5))
    assert ck.spec.languages == "multilingual (~100)" and ck.spec.license == "mit"
    assert not ck.spec.bundled and ck.spec.name == str(ml_e5)


def test_unrecognised_local_checkpoint_stays_unknown(tiny_bert):
    spec = load_checkpoint(str(tiny_bert)).spec
    assert (spec.languages, spec.license) == ("unknown", "unknown")
