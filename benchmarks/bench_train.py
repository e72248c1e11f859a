"""Fine-tune multilingual-e5-small on SciFact train with e5kit's recipe; compare with
sentence-transformers' CachedMultipleNegativesRankingLoss on the same data in the same run.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_train.py [--train-examples 512] ...

Phases (each training run is its own subprocess, so its peak RSS is its own):
  1. `e5kit mine` hard negatives for SciFact train queries (qrels/train.tsv)
  2. SciFact test nDCG@10 of the base model
  3. e5kit train, GradCache, contrastive batch 256 (queries) x (positive + 1 mined negative)
  4. sentence-transformers CachedMNRL (scale 100 = temperature 0.01), same examples, batch, chunk, lr
  5. SciFact test nDCG@10 of the fine-tuned model
  6. peak memory of one step at batch 256 with and without GradCache (short sequences: without
     GradCache the full batch's activations must fit in RAM)

On a 2-core CPU the full corpus and full-length passages take far too long, so by default the
evaluation corpus is the test-relevant documents plus a seeded random sample of the rest, and
passages are cut at --passage-len tokens. Everything is printed with the settings used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def sh(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return time.perf_counter() - t, r.stdout + r.stderr


def subset_beir(src: Path, dst: Path, split: str, n_docs: int, seed: int) -> Path:
    """A BEIR folder with the split's relevant documents plus random others (n_docs in all; 0 = all)."""
    from e5kit.train.mining import load_beir

    b = load_beir(src, split)
    rel = {d for q in b.qrels.values() for d in q}
    keep = set(b.doc_ids) if n_docs <= 0 else set(rel)
    others = [d for d in b.doc_ids if d not in rel]
    random.Random(seed).shuffle(others)
    keep |= set(others[:max(0, n_docs - len(keep))])
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    with open(src / "corpus.jsonl") as f, open(dst / "corpus.jsonl", "w") as g:
        for line in f:
            if json.loads(line)["_id"] in keep:
                g.write(line)
    qids = set(b.qrels)
    with open(src / "queries.jsonl") as f, open(dst / "queries.jsonl", "w") as g:
        for line in f:
            if json.loads(line)["_id"] in qids:
                g.write(line)
    shutil.copy(src / "qrels" / f"{split}.tsv", dst / "qrels" / f"{split}.tsv")
    return dst


def ndcg10(model_dir: Path, beir: Path, max_len: int, threads: int) -> tuple[float, float]:
    """SciFact test nDCG@10 (exact search, pytrec_eval) and seconds taken."""
    import pytrec_eval

    from e5kit import E5
    from e5kit.train.mining import embed_texts, exact_search, load_beir

    t = time.perf_counter()
    m = E5(str(model_dir), threads=threads)
    b = load_beir(beir, "test")
    qids = list(b.qrels)
    d = embed_texts(m, b.docs, "passage", max_len, 32)
    q = embed_texts(m, [b.queries[x] for x in qids], "query", max_len, 32)
    s, i = exact_search(q, d, 100)
    run = {qid: {b.doc_ids[j]: float(v) for v, j in zip(s[n].tolist(), i[n].tolist())} for n, qid in enumerate(qids)}
    ev = pytrec_eval.RelevanceEvaluator({k: {d: int(r) for d, r in v.items()} for k, v in b.qrels.items()}, {"ndcg_cut_10"})
    res = ev.evaluate(run)
    return sum(r["ndcg_cut_10"] for r in res.values()) / len(res), time.perf_counter() - t


ST_SCRIPT = r'''
import json, resource, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.losses import CachedMultipleNegativesRankingLoss
model_dir, data, batch, chunk, max_len, lr, threads, seed = sys.argv[1:9]
batch, chunk, max_len, threads, seed = int(batch), int(chunk), int(max_len), int(threads), int(seed)
torch.set_num_threads(threads)
torch.manual_seed(seed)
rows = [json.loads(x) for x in open(data)]
def text(p):
    return p if isinstance(p, str) else f"{p.get('title') or ''} {p['text']}".strip()
m = SentenceTransformer(model_dir, device="cpu")
m.max_seq_length = max_len
loss = CachedMultipleNegativesRankingLoss(m, scale=100.0, mini_batch_size=chunk)
opt = torch.optim.AdamW(m.parameters(), lr=float(lr), weight_decay=0.01)
m.train()
steps = []
for s in range(len(rows) // batch):
    b = rows[s * batch:(s + 1) * batch]
    t = time.perf_counter()
    feats = [m.preprocess(["query: " + r["query"] for r in b]), m.preprocess(["passage: " + text(r["positive"]) for r in b]),
             m.preprocess(["passage: " + text(r["negatives"][0]) for r in b])]
    l = loss(feats, None)
    l.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad()
    steps.append({"loss": float(l), "step_s": time.perf_counter() - t})
print(json.dumps({"steps": steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/e5kit-bench-train")
    ap.add_argument("--train-examples", type=int, default=0, help="mined examples trained on (0 = all)")
    ap.add_argument("--eval-docs", type=int, default=1000, help="evaluation corpus size (0 = all 5,183)")
    ap.add_argument("--mine-docs", type=int, default=0, help="mining corpus size (0 = all)")
    ap.add_argument("--passage-len", type=int, default=64, help="token limit for training and mining")
    ap.add_argument("--eval-len", type=int, default=128, help="token limit for evaluation")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--mem-len", type=int, default=32, help="token limit for the with/without GradCache memory runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-st", action="store_true")
    a = ap.parse_args()

    from conftest import materialized_ml_e5
    from helpers import SHARED

    model = materialized_ml_e5(SHARED)
    scifact = SHARED / "data" / "scifact"
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    py = sys.executable
    res: dict = {"settings": vars(a)}
    print(f"model {model}\nsettings {vars(a)}", flush=True)

    # 1. mining
    mine_dir = subset_beir(scifact, work / "mine-beir", "train", a.mine_docs, 0)
    eval_dir = subset_beir(scifact, work / "eval-beir", "test", a.eval_docs, 0)
    mined = work / "mined.jsonl"
    dt, _ = sh([py, "-m", "e5kit", "mine", "--beir", str(mine_dir), "--split", "train", "--negatives", "1",
                "--skip-top", "3", "--max-length", str(a.passage_len), "-m", str(model), "--threads", str(a.threads),
                "-o", str(mined)])
    rows = mined.read_text().splitlines()
    n_docs = sum(1 for _ in open(mine_dir / "corpus.jsonl"))
    res["mine"] = {"seconds": dt, "examples": len(rows), "corpus_docs": n_docs}
    print(f"mined {len(rows)} examples over {n_docs} docs in {dt:.0f}s", flush=True)
    random.Random(0).shuffle(rows)
    n_train = (a.train_examples or len(rows)) // a.batch * a.batch
    train_file = work / "train.jsonl"
    train_file.write_text("\n".join(rows[:n_train]) + "\n")

    # 2. before
    before, t_eval = ndcg10(model, eval_dir, a.eval_len, a.threads)
    res["ndcg10_before"] = before
    print(f"nDCG@10 before {before:.4f} ({t_eval:.0f}s)", flush=True)

    # 3. ours
    common = ["--data", str(train_file), "--model", str(model), "--batch-size", str(a.batch), "--negatives", "1",
              "--query-max-length", str(a.passage_len), "--passage-max-length", str(a.passage_len),
              "--lr", str(a.lr), "--threads", str(a.threads), "--no-progress", "--epochs", "1", "--warmup-steps", "0"]
    out = work / "ours"
    dt, _ = sh([py, "-m", "e5kit", "train", *common, "--chunk-size", str(a.chunk), "--output-dir", str(out)])
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_s = sum(r["step_s"] for r in m)
    res["ours"] = {"wall_s": dt, "train_s": step_s, "steps": len(m), "examples_per_s": n_train / step_s,
                   "peak_rss_mb": m[-1]["peak_memory_mb"], "losses": [r["loss"] for r in m]}
    print(f"e5kit: {len(m)} steps, {n_train / step_s:.2f} examples/s, peak {m[-1]['peak_memory_mb']:.0f} MB, "
          f"wall {dt:.0f}s", flush=True)

    # 4. sentence-transformers
    if not a.skip_st:
        dt, text = sh([py, "-c", ST_SCRIPT, str(model), str(train_file), str(a.batch), str(a.chunk), str(a.passage_len),
                       str(a.lr), str(a.threads), "0"])
        st = json.loads(next(ln for ln in text.splitlines() if ln.startswith('{"steps"')))
        st_s = sum(s["step_s"] for s in st["steps"])
        res["st"] = {"wall_s": dt, "train_s": st_s, "steps": len(st["steps"]), "examples_per_s": n_train / st_s,
                     "peak_rss_mb": st["peak_rss_mb"], "losses": [s["loss"] for s in st["steps"]]}
        print(f"sentence-transformers CachedMNRL: {n_train / st_s:.2f} examples/s, peak {st['peak_rss_mb']:.0f} MB, "
              f"wall {dt:.0f}s; e5kit/ST throughput {res['ours']['examples_per_s'] / res['st']['examples_per_s']:.2f}x",
              flush=True)

    # 5. after
    after, _ = ndcg10(out, eval_dir, a.eval_len, a.threads)
    res["ndcg10_after"] = after
    print(f"nDCG@10 after {after:.4f} (gain {after - before:+.4f})", flush=True)

    # 6. memory at batch 256, with and without GradCache (one step each, short sequences)
    mem = {}
    for name, extra in (("gradcache", ["--chunk-size", str(a.chunk)]), ("full_batch", [])):
        o = work / f"mem-{name}"
        cmd = [py, "-m", "e5kit", "train", *common, *extra, "--output-dir", str(o), "--max-steps", "1",
               "--query-max-length", str(a.mem_len), "--passage-max-length", str(a.mem_len)]
        dt, _ = sh(cmd)
        r = json.loads((o / "metrics.jsonl").read_text().splitlines()[-1])
        mem[name] = {"peak_rss_mb": r["peak_memory_mb"], "step_s": r["step_s"]}
        print(f"memory {name}: peak {r['peak_memory_mb']:.0f} MB, step {r['step_s']:.1f}s", flush=True)
    res["memory"] = mem
    (work / "results.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
