"""Issue 2: e5kit fp32 vs sentence-transformers fp32 on SciFact passages, side by side.

Random-weight models of e5-small-v2's (and e5-large-v2's) shape with the real e5-small-v2
tokenizer; the same texts (``passage: title text``); ST's ``encode(batch_size=32)`` against
e5kit's ``encode`` (batch_size=32, token-budget batches). Each system runs in its own process
(so peak RSS is its own), rounds alternate e5kit / ST, and the best round counts.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_engine.py --shape small --n 400 --rounds 2
    flock /tmp/e5kit-cpu.lock python benchmarks/bench_engine.py --shape large --n 1000 --rounds 1
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import count_tokens, random_model, run_worker, scifact_passages  # noqa: E402


def compare(systems: list[str], model_dir: Path, texts: list[str], rounds: int, threads: int,
            baseline: str = "st-fp32") -> dict[str, dict]:
    """Run each system ``rounds`` times (interleaved), print a table with ratios to ``baseline``."""
    ntok = count_tokens(model_dir, texts)
    tmp = Path(tempfile.mkdtemp(prefix="e5kit-bench-"))
    best: dict[str, dict] = {}
    for r in range(rounds):
        for s in systems:
            res = run_worker(s, model_dir, texts, str(tmp / f"{s}.npy"), "throughput", 32, threads)
            print(f"  round {r + 1} {s:14} {ntok / res['seconds']:8.0f} tok/s  ({res['seconds']:.1f} s)", flush=True)
            if s not in best or res["seconds"] < best[s]["seconds"]:
                best[s] = res
    ref = np.load(tmp / f"{baseline}.npy")
    print(f"\n{len(texts)} texts, {ntok} tokens ({ntok / len(texts):.0f}/text), best of {rounds}")
    print(f"{'system':16}{'tok/s':>9}{'texts/s':>9}{'peak RSS MB':>13}{'x ' + baseline:>12}{'max|diff|':>11}{'min cos':>9}")
    base_t = best[baseline]["seconds"]
    for s, res in best.items():
        emb = np.load(tmp / f"{s}.npy")
        diff = float(np.abs(emb - ref).max())
        cos = float((emb * ref).sum(1).min())
        res.update(tok_s=ntok / res["seconds"], texts_s=len(texts) / res["seconds"], ratio=base_t / res["seconds"],
                   max_abs_diff=diff, min_cos=cos)
        print(f"{s:16}{res['tok_s']:9.0f}{res['texts_s']:9.2f}{res['peak_rss_mb']:13.0f}{res['ratio']:12.2f}"
              f"{diff:11.1e}{cos:9.5f}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["small", "large"], default="small")
    ap.add_argument("--n", type=int, default=400, help="SciFact passages (fixed random sample; 0 = all 5,183)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="0: the libraries' default (all cores)")
    ap.add_argument("--systems", default="e5kit-fp32,st-fp32",
                    help="comma-separated, from benchmarks/common.py load_system (e.g. e5kit-bf16, e5kit-int8, "
                         "st-bf16); st-fp32 is the baseline and always runs")
    args = ap.parse_args()
    model_dir = random_model(args.shape)
    texts = scifact_passages(args.n or None)
    print(f"e5-{args.shape}-v2-shaped random model: {model_dir}")
    systems = [x for x in args.systems.split(",") if x and x != "st-fp32"] + ["st-fp32"]
    best = compare(systems, model_dir, texts, args.rounds, args.threads)
    if "e5kit-fp32" not in best:
        return
    ok = best["e5kit-fp32"]["max_abs_diff"] <= 1e-5
    print(f"\ne5kit fp32 / ST fp32 tokens/s: {best['e5kit-fp32']['ratio']:.2f}x (target >= 1.3x); "
          f"max abs diff {best['e5kit-fp32']['max_abs_diff']:.1e} ({'<=' if ok else '>'} 1e-5)")


if __name__ == "__main__":
    main()
