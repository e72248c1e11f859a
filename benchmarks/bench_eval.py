"""Evaluation figures with the shared multilingual-e5-small (4-bit copy), with and without prefixes:
full SciFact test (nDCG@10, Recall@100, corpus embedding time, time per query), STS Benchmark test
(Spearman), Banking77 (accuracy, MTEB 8-shot and full training set).

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_eval.py [--tasks sts,banking77,scifact]

Each (task, prefix setting) result is written to .bench/eval/ as soon as it is done, so a long run
can be resumed task by task; the report (HTML + Markdown) is rebuilt from all results at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared"


def shared_model() -> Path:
    """The materialised shared model (the test suite's cache), materialising it if needed."""
    import hashlib
    import os

    src = SHARED / "models" / "multilingual-e5-small-q4"
    binf = src / "e5-small-q4.bin"
    h = hashlib.sha256(binf.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("E5KIT_TEST_CACHE", Path.home() / ".cache" / "e5kit-tests"))
    out = root / f"multilingual-e5-small-q4-{h}"
    if not (out / "model.safetensors").exists():
        subprocess.run([sys.executable, str(src / "materialize.py"), str(binf), str(out)], check=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="Model dir (default: the shared multilingual-e5-small copy).")
    ap.add_argument("--tasks", default="sts,banking77,scifact")
    ap.add_argument("--styles", default="e5,none", help="Prompt styles to run: e5 (prefixes), none (no prefix).")
    ap.add_argument("--max-tokens", type=int, default=None, help="Cap document length (default: the model's 512).")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "eval"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()

    import torch

    from e5kit import E5
    from e5kit.evaluate.report import load_results, run_dirname, write_report, write_results
    from e5kit.evaluate.tasks import evaluate_classification, evaluate_retrieval, evaluate_sts

    model_dir = args.model or str(shared_model())
    model = E5(model_dir, threads=args.threads)
    if args.max_tokens:
        model.engine.max_tokens = args.max_tokens
        model.engine.tokenizer.enable_truncation(args.max_tokens)
    print(f"model {model_dir}: dim {model.dim}, torch threads {torch.get_num_threads()}, "
          f"max tokens {model.max_tokens}", flush=True)
    out = Path(args.out)
    data = SHARED / "data"
    for style in args.styles.split(","):
        label = ("multilingual-e5-small-q4" + (f" max{args.max_tokens}tok" if args.max_tokens else "")
                 + (" (no prefix)" if style == "none" else ""))
        for task in args.tasks.split(","):
            t = time.perf_counter()
            if task == "scifact":
                run = evaluate_retrieval(model, data / "scifact", "test", prompt_style=style, progress=True)
                d = run.details
                print(f"[{label}] SciFact nDCG@10 {100 * run.scores['ndcg_at_10']:.2f}  Recall@100 "
                      f"{100 * run.scores['recall_at_100']:.2f}  corpus {d['n_documents']} docs / "
                      f"{d['n_document_tokens']:,} tokens embedded in {d['corpus_embedding_seconds']:.1f} s "
                      f"({d['n_document_tokens'] / d['corpus_embedding_seconds']:,.0f} tok/s), "
                      f"{1000 * d['seconds_per_query']:.1f} ms/query", flush=True)
            elif task == "sts":
                run = evaluate_sts(model, data / "stsbenchmark", split="test", prompt_style=style)
                print(f"[{label}] STSBenchmark test Spearman {100 * run.scores['cosine_spearman']:.2f}", flush=True)
            elif task == "banking77":
                run = evaluate_classification(model, data / "banking77", prompt_style=style)
                print(f"[{label}] Banking77 accuracy {100 * run.scores['accuracy']:.2f} (MTEB 8-shot x10), "
                      f"{100 * run.scores['full_train_accuracy']:.2f} (full train); macro-F1 "
                      f"{100 * run.scores['f1']:.2f} / {100 * run.scores['full_train_f1']:.2f}", flush=True)
            else:
                raise SystemExit(f"unknown task {task}")
            meta = {"model": model_dir, "prompt_style": style, "dim": model.dim, "max_tokens": model.max_tokens}
            # merge with this label's earlier tasks, so runs can be split across invocations
            run_dir = out / "results" / run_dirname(label)
            previous = load_results(run_dir)[2] if (run_dir / "model_meta.json").exists() else []
            runs = [r for r in previous if r.task_name != run.task_name] + [run]
            write_results(out, label, meta, runs)
            print(f"    ({time.perf_counter() - t:.0f} s)", flush=True)

    runs_by_label, metas = {}, {}
    for d in sorted((out / "results").iterdir()):
        lb, meta, runs = load_results(d)
        runs_by_label[lb], metas[lb] = runs, meta
    page, md = write_report(out, runs_by_label, metas)
    print(f"report: {page} / {md}")
    summary = {lb: {r.task_name: {k: v for k, v in r.scores.items() if isinstance(v, float)} for r in runs}
               for lb, runs in runs_by_label.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
