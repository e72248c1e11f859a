"""Issue 16: e5kit's CPU paths against OpenVINO and ONNX Runtime on the real multilingual-e5-small.

Systems (one process each, rounds interleaved): e5kit fp32 / bf16 / int8; OpenVINO through
sentence-transformers' ``backend="openvino"`` (optimum-intel) in f32, with the bf16 precision hint,
and statically quantized to int8 by NNCF (calibrated on 64 SciFact passages, another sample than
the measured ones); sentence-transformers' ONNX backend with its dynamic qint8 export (ONNX Runtime). The peers
run from their own virtualenvs (docs/speed.md, "Peers").

1. Passage throughput: ``--n`` SciFact passages, batch 32; cosine of every vector to e5kit fp32.
2. Single short query latency: ``--queries`` SciFact queries, one per call, p50 / p99.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_peers.py --n 300 --queries 200 --rounds 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_int8 import ml_e5_dir, short_queries  # noqa: E402
from common import count_tokens, onnx_qint8_dir, openvino_dir, run_worker, scifact_passages  # noqa: E402

OURS = ["e5kit-fp32", "e5kit-bf16", "e5kit-int8"]
PEERS = ["ov-fp32", "ov-bf16", "ov-int8", "st-onnx-qint8"]


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), []))
    isa = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    return f"{name} ({', '.join(isa) or 'no AVX-512 VNNI/bf16/AMX'})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="SciFact passages for throughput (0: skip)")
    ap.add_argument("--queries", type=int, default=200, help="single queries for latency (0: skip)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--systems", default=",".join(OURS + PEERS))
    args = ap.parse_args()

    ml = ml_e5_dir()
    systems = [s for s in args.systems.split(",") if s]
    dirs = {s: ml for s in systems}
    if any(s.startswith("ov-") for s in systems):
        ov = openvino_dir(ml, scifact_passages(64, seed=1))
        dirs.update({s: ov for s in systems if s.startswith("ov-")})
    if "st-onnx-qint8" in systems:
        dirs["st-onnx-qint8"] = onnx_qint8_dir(ml)
    print(f"CPU: {cpu_model()}; model: multilingual-e5-small ({ml})")

    if args.n:
        texts = scifact_passages(args.n)
        ntok = count_tokens(ml, texts)
        tmp = Path(tempfile.mkdtemp(prefix="e5kit-peers-"))
        best: dict[str, dict] = {}
        print(f"\n== throughput: {len(texts)} SciFact passages, {ntok} tokens, batch 32 ==")
        for r in range(args.rounds):
            for s in systems:
                res = run_worker(s, dirs[s], texts, str(tmp / f"{s}.npy"), "throughput", 32, args.threads)
                print(f"  round {r + 1} {s:14} {ntok / res['seconds']:8.0f} tok/s", flush=True)
                if s not in best or res["seconds"] < best[s]["seconds"]:
                    best[s] = res
        ref = np.load(tmp / "e5kit-fp32.npy") if "e5kit-fp32" in best else None
        print(f"\n{'system':16}{'tok/s':>9}{'peak RSS MB':>13}{'min cos fp32':>14}")
        for s, res in best.items():
            emb = np.load(tmp / f"{s}.npy")
            emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
            cos = float((emb * ref).sum(1).min()) if ref is not None else float("nan")
            print(f"{s:16}{ntok / res['seconds']:9.0f}{res['peak_rss_mb']:13.0f}{cos:14.5f}")

    if args.queries:
        qs = short_queries(args.queries)
        lat: dict[str, dict] = {}
        print(f"\n== single-query latency: {len(qs)} SciFact queries, one per call ==")
        for r in range(args.rounds):
            for s in systems:
                res = run_worker(s, dirs[s], qs, mode="latency", threads=args.threads)
                print(f"  round {r + 1} {s:14} p50 {res['p50_ms']:7.2f} ms  p99 {res['p99_ms']:7.2f} ms", flush=True)
                if s not in lat or res["p50_ms"] < lat[s]["p50_ms"]:
                    lat[s] = res
        print(f"\n{'system':16}{'p50 ms':>9}{'p99 ms':>9}")
        for s, res in lat.items():
            print(f"{s:16}{res['p50_ms']:9.2f}{res['p99_ms']:9.2f}")


if __name__ == "__main__":
    main()
