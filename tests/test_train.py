"""Training: loss values, GradCache gradients, resume, checkpoints, data validation, mining, filter."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from e5kit.encoder import embed_batch
from e5kit.loading import load_checkpoint, load_encoder, load_tokenizer
from e5kit.train import DataError, TrainConfig, load_examples, train
from e5kit.train.gradcache import full_batch_step, grad_cache_step
from e5kit.train.losses import contrastive_loss
from helpers import _WORDS, reference_embed

TOPIC = _WORDS[50:]  # content words of the tiny vocabulary


def write_data(path: Path, n: int, negatives: int = 2, seed: int = 0, teacher: bool = False) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            row = {"query": " ".join(rng.choices(TOPIC, k=4)), "positive": " ".join(rng.choices(TOPIC, k=rng.randint(6, 14)))}
            if negatives:
                row["negatives"] = [" ".join(rng.choices(TOPIC, k=rng.randint(5, 12))) for _ in range(negatives)]
            if teacher:
                row["teacher_scores"] = [rng.uniform(2, 4)] + [rng.uniform(-1, 2) for _ in range(negatives)]
            f.write(json.dumps(row) + "\n")
    return path


# ---- losses -------------------------------------------------------------------------------------

def test_infonce_and_distillation_equal_hand_computation():
    torch.manual_seed(0)
    B, G, d, tau, alpha = 3, 3, 8, 0.05, 0.3
    q = torch.nn.functional.normalize(torch.randn(B, d, dtype=torch.float64), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(B * G, d, dtype=torch.float64), dim=-1)
    teacher = torch.randn(B, G, dtype=torch.float64)
    qn, pn, tn = q.numpy(), p.numpy(), teacher.numpy()
    infonce, kl = 0.0, 0.0
    for i in range(B):
        logits = [float(qn[i] @ pn[j]) / tau for j in range(B * G)]
        lse = math.log(sum(math.exp(x) for x in logits))
        infonce += (lse - logits[i * G]) / B
        own = logits[i * G:(i + 1) * G]
        own_lse = math.log(sum(math.exp(x) for x in own))
        t = [math.exp(x) for x in tn[i]]
        t = [x / sum(t) for x in t]
        kl += sum(t[j] * (math.log(t[j]) - (own[j] - own_lse)) for j in range(G)) / B
    out = contrastive_loss(q, p, G, temperature=tau)
    assert out.loss.item() == pytest.approx(infonce, rel=1e-6)
    out = contrastive_loss(q, p, G, temperature=tau, teacher_scores=teacher, alpha=alpha)
    assert out.kl.item() == pytest.approx(kl, rel=1e-5)
    assert out.loss.item() == pytest.approx(kl + alpha * infonce, rel=1e-5)
    with pytest.raises(ValueError, match="expected 9 passages"):
        contrastive_loss(q, p[:-1], G)


# ---- GradCache ----------------------------------------------------------------------------------

def _grads(model, step, chunks, B, G, **kw) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    enc = lambda c: embed_batch(model, c)  # noqa: E731
    loss_fn = lambda e: contrastive_loss(e[:B], e[B:], G)  # noqa: E731
    out = step(enc, chunks, loss_fn, **kw)
    return out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["bert", "xlm-roberta"])
def test_gradcache_gradient_equals_full_batch(kind, tiny_bert, tiny_xlmr, tmp_path):
    path = tiny_bert if kind == "bert" else tiny_xlmr
    ck = load_checkpoint(path)
    ex = load_examples(write_data(tmp_path / "d.jsonl", 6, negatives=2), negatives=2)
    tok = load_tokenizer(ck.path, 64)
    q = [e.ids for e in tok.encode_batch(["query: " + e.query for e in ex])]
    p = [e.ids for e in tok.encode_batch(["passage: " + t for e in ex for t in [e.positive, *e.negatives]])]
    B, G = len(q), 3
    import dataclasses

    model = load_encoder(ck.path, dataclasses.replace(ck.config, hidden_dropout=0.0, attention_dropout=0.0)).train()
    chunks = [q[i:i + 4] for i in range(0, B, 4)] + [p[i:i + 4] for i in range(0, len(p), 4)]
    # no dropout: GradCache (chunks of 4) == one plain backward over the whole batch. In fp64 the
    # only difference is summation order, so 1e-5 absolute is tight; in fp32 (tau = 0.01 scales
    # gradients to ~60) the same holds relative to the gradient's size.
    for dtype, rtol in ((torch.float64, 0.0), (torch.float32, 1e-5)):
        model.to(dtype)
        loss_full, g_full = _grads(model, full_batch_step, [q, p], B, G)
        loss_gc, g_gc = _grads(model, grad_cache_step, chunks, B, G)
        assert loss_gc == pytest.approx(loss_full, abs=1e-6, rel=rtol)
        for n in g_full:
            torch.testing.assert_close(g_gc[n], g_full[n], atol=1e-5, rtol=rtol, msg=n)
    # gradient checkpointing gives the same gradient too
    model.gradient_checkpointing = True
    _, g_ckpt = _grads(model, grad_cache_step, chunks, B, G)
    model.gradient_checkpointing = False
    for n in g_full:
        torch.testing.assert_close(g_ckpt[n], g_full[n], atol=1e-5, rtol=1e-5, msg=n)
    # with dropout, GradCache replays each chunk's RNG state: same masks as the plain pass
    drop = load_encoder(ck.path, dataclasses.replace(ck.config, hidden_dropout=0.1, attention_dropout=0.1)).train().double()
    l1, g1 = _grads(drop, full_batch_step, chunks, B, G)
    l2, g2 = _grads(drop, grad_cache_step, chunks, B, G)
    assert l1 == pytest.approx(l2, abs=1e-6) and l1 != pytest.approx(loss_full, abs=1e-4)  # dropout is active
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-5, rtol=0, msg=n)


def test_bf16_gradcache_on_cpu(tiny_bert, tmp_path):
    """bf16 autocast + GradCache on CPU (docs/train.md's config) trains: the chunked no-grad pass
    goes through autocast like the re-encode, so both see the same embeddings and the gradient is
    the bf16 full-batch one. (It used to die in oneDNN: a bf16 activation met an fp32 weight.)"""
    import dataclasses

    ck = load_checkpoint(tiny_bert)
    ex = load_examples(write_data(tmp_path / "d.jsonl", 8, negatives=1), negatives=1)
    tok = load_tokenizer(ck.path, 64)
    q = [e.ids for e in tok.encode_batch(["query: " + e.query for e in ex])]
    p = [e.ids for e in tok.encode_batch(["passage: " + t for e in ex for t in [e.positive, *e.negatives]])]
    B = len(q)
    model = load_encoder(ck.path, dataclasses.replace(ck.config, hidden_dropout=0.0, attention_dropout=0.0)).train()

    def bf16(step, chunks):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = step(lambda c: embed_batch(model, c), chunks, lambda e: contrastive_loss(e[:B], e[B:], 2))
        return out.loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    loss_full, g_full = bf16(full_batch_step, [q, p])
    loss_gc, g_gc = bf16(grad_cache_step, [q[i:i + 4] for i in range(0, B, 4)] + [p[i:i + 4] for i in range(0, len(p), 4)])
    assert loss_gc == pytest.approx(loss_full, rel=2e-2)
    cos = torch.nn.functional.cosine_similarity(g_gc.float(), g_full.float(), dim=0)
    assert cos > 0.99, cos
    res = train(_cfg(tiny_bert, write_data(tmp_path / "t.jsonl", 16, negatives=1), tmp_path / "o", negatives=1,
                     batch_size=8, chunk_size=4, precision="bf16", max_steps=2))
    assert res.steps == 2 and all(math.isfinite(r["loss"]) for r in res.history)
    assert (tmp_path / "o" / "model.safetensors").exists()


# ---- training runs ------------------------------------------------------------------------------

def _cfg(model, data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), model=str(model), output_dir=str(out), batch_size=4, negatives=2, lr=1e-3,
                query_max_length=32, passage_max_length=48, threads=1, progress=False, seed=7)
    return TrainConfig(**(base | kw))


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _weights(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_resume_continues_the_same_run(tiny_bert, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 14, negatives=3, seed=1)
    # 14 examples / batch 4 -> 3 steps per epoch; 2 epochs; dropout on so RNG restore matters
    kw = dict(epochs=2, chunk_size=3, dropout=0.1, warmup_steps=2)
    full = train(_cfg(tiny_bert, data, tmp_path / "full", save_every=2, save_total_limit=5, **kw))
    assert full.steps == 6 and (tmp_path / "full" / "checkpoint-4" / "trainer_state.pt").exists()
    # a run stopped after step 4 (its checkpoint-4), resumed with the same config
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-4", part / "checkpoint-4")
    resumed = train(_cfg(tiny_bert, data, part, resume="auto", **kw))
    assert [h["step"] for h in resumed.history] == [5, 6]
    for a, b in zip(full.history[4:], resumed.history):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6) and b["lr"] == pytest.approx(a["lr"])
    wa, wb = _weights(tmp_path / "full"), _weights(part)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0, msg=k)
    # and the run learned something: the loss fell, the weights moved
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    w0 = load_file(str(Path(tiny_bert) / "model.safetensors"))
    assert (wa["encoder.layer.0.output.dense.weight"] - w0["encoder.layer.0.output.dense.weight"]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["ml-small", "xlm-roberta"])
def test_checkpoint_loads_in_transformers_sentence_transformers_and_e5kit(kind, tiny_mlsmall, tiny_xlmr, tmp_path):
    from sentence_transformers import SentenceTransformer

    from e5kit import E5

    model = tiny_mlsmall if kind == "ml-small" else tiny_xlmr
    data = write_data(tmp_path / "d.jsonl", 12, negatives=1, teacher=True)
    res = train(_cfg(model, data, tmp_path / "out", negatives=1, max_steps=2, precision="bf16", log_every=1))
    out = res.output_dir
    assert "kl" in res.history[0]  # teacher scores switch distillation on
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["examples_per_s"] > 0 for r in rows)
    meta = json.loads((out / "e5kit.json").read_text())
    assert meta["prompt_style"] == "e5" and meta["base_model"] == str(model)
    # the weights did change, so this is not comparing the base model with itself
    w0, w1 = _weights(Path(model)), _weights(out)
    assert set(w1) <= set(w0) and any((w1[k] - w0[k]).abs().max() > 1e-5 for k in w1)
    texts = ["query: protein female eat", "passage: the cell study of gene and cancer risk", "passage: a"]
    ref = reference_embed(out, texts)
    ours = E5(str(out)).encode(texts)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    st_model = SentenceTransformer(str(out), device="cpu")
    st = st_model.encode(texts, convert_to_numpy=True)
    np.testing.assert_allclose(st, ref, atol=1e-5)
    # ST's encode_query / encode_document find E5's prefixes in the checkpoint's prompts
    q, d = ["protein female eat"], ["the cell study of gene and cancer risk"]
    np.testing.assert_allclose(st_model.encode_query(q), E5(str(out)).encode_queries(q), atol=1e-5)
    np.testing.assert_allclose(st_model.encode_document(d), E5(str(out)).encode_passages(d), atol=1e-5)
    # every written file is readable by others like the rest (safetensors creates 0600)
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir() if f.is_file()} == {oct(0o666 & ~_umask())}


# ---- data validation ----------------------------------------------------------------------------

BAD_LINES = [
    '{"query": "protein", "positive": "the cell study", "negatives": ["gene risk"]}',  # 1 ok
    '{"query": "protein", "negatives": ["gene"]}',  # 2 missing positive
    '',  # 3 blank: ignored
    '{"query": "   ", "positive": "the cell"}',  # 4 empty query
    '{"query": "protein", "positive": "the cell", ',  # 5 malformed
    '{"query": "eat", "positive": {"title": "T", "text": "cancer study"}, "negatives": [""]}',  # 6 empty negative
    '{"query": "eat", "positive": "cell", "teacher_scores": [1.0, 2.0]}',  # 7 wrong score count
    '["query", "positive"]',  # 8 not an object
    '{"query": "women", "positive": {"title": "T", "text": "grams day"}, "negatives": ["summit"]}',  # 9 ok
]


def test_bad_data_is_reported_with_line_numbers(tiny_bert, tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(BAD_LINES) + "\n")
    with pytest.raises(DataError) as e:
        load_examples(f)
    msg = str(e.value)
    assert [n for n, _ in e.value.problems] == [2, 4, 5, 6, 7, 8]
    for needle in ("bad.jsonl:2: missing field 'positive'", "bad.jsonl:4: 'query' is empty", "bad.jsonl:5: not valid JSON",
                   "bad.jsonl:6: 'negatives'[0] is empty", "bad.jsonl:7: 'teacher_scores' has 2 values",
                   "bad.jsonl:8: expected a JSON object"):
        assert needle in msg
    kept = load_examples(f, skip_bad=True)
    assert [x.line for x in kept] == [1, 9] and kept[1].positive == "T grams day"
    # training refuses the file before doing anything, and names the lines
    out = tmp_path / "out"
    r = CliRunner().invoke(_main(), ["train", "--data", str(f), "--model", str(tiny_bert), "--output-dir", str(out),
                                     "--batch-size", "2", "--negatives", "1", "--no-progress"])
    assert r.exit_code != 0 and "bad.jsonl:5: not valid JSON" in r.output and not out.exists()
    # ... or skips them when told, and trains on the rest
    r = CliRunner().invoke(_main(), ["train", "--data", str(f), "--model", str(tiny_bert), "--output-dir", str(out),
                                     "--batch-size", "2", "--negatives", "1", "--no-progress", "--skip-bad-lines",
                                     "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").exists()
    # pair data without negatives cannot feed a run that asks for hard negatives
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(DataError, match="pairs.jsonl:1: no 'negatives'"):
        load_examples(pairs, negatives=1)


def test_yaml_config_and_flag_overrides(tiny_bert, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 8, negatives=0)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {data}\nmodel: {tiny_bert}\noutput_dir: {tmp_path / 'o'}\nbatch_size: 4\nnegatives: 0\n"
                   f"epochs: 3\nthreads: 1\nprogress: false\n")
    r = CliRunner().invoke(_main(), ["train", str(cfg), "--max-steps", "1", "--temperature", "0.05"])
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["max_steps"] == 1 and saved["temperature"] == 0.05 and saved["epochs"] == 3
    assert len((tmp_path / "o" / "metrics.jsonl").read_text().splitlines()) == 1
    cfg.write_text("bogus_option: 1\n")
    r = CliRunner().invoke(_main(), ["train", str(cfg)])
    assert r.exit_code != 0 and "bogus_option" in r.output


def test_train_command_sets_its_thread_default_and_takes_backend(tiny_bert, tmp_path, monkeypatch):
    """Like the other model-loading commands: --backend is accepted (torch; int8 refused before anything
    loads) and the command, not the library, sets torch's threads to its default (OMP_NUM_THREADS here)."""
    data = write_data(tmp_path / "d.jsonl", 4, negatives=0)
    args = ["train", "-d", str(data), "-m", str(tiny_bert), "--negatives", "0", "--batch-size", "2", "--max-steps", "1",
            "--no-progress"]
    r = CliRunner().invoke(_main(), args + ["-o", str(tmp_path / "q"), "--backend", "int8"])
    assert r.exit_code == 2 and "int8 is an inference backend" in r.output and not (tmp_path / "q").exists()
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    try:
        r = CliRunner().invoke(_main(), args + ["-o", str(tmp_path / "o"), "--backend", "torch"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "o" / "train_config.json").read_text())["threads"] == 3


# ---- mining and filtering -----------------------------------------------------------------------

def _main():
    from e5kit.cli import main

    return main


def _beir(root: Path, n_docs: int = 30, n_queries: int = 6) -> Path:
    rng = random.Random(3)
    (root / "qrels").mkdir(parents=True)
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(n_docs):
            f.write(json.dumps({"_id": f"d{i}", "title": rng.choice(TOPIC), "text": " ".join(rng.choices(TOPIC, k=8))}) + "\n")
    with open(root / "queries.jsonl", "w") as f:
        for i in range(n_queries):
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(rng.choices(TOPIC, k=3))}) + "\n")
    with open(root / "qrels" / "train.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_queries):
            for d in {rng.randrange(n_docs) for _ in range(2)}:
                f.write(f"q{i}\td{d}\t1\n")
    return root


def test_mine_writes_top_ranked_non_positive_passages(tiny_bert, tmp_path):
    from e5kit import E5

    root = _beir(tmp_path / "beir")
    out = tmp_path / "mined.jsonl"
    r = CliRunner().invoke(_main(), ["mine", "--beir", str(root), "--output", str(out), "--negatives", "4",
                                     "--skip-top", "2", "--model", str(tiny_bert), "--threads", "1"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    qrels = {}
    for ln in (root / "qrels" / "train.tsv").read_text().splitlines()[1:]:
        q, d, _ = ln.split("\t")
        qrels.setdefault(q, set()).add(d)
    assert len(rows) == sum(len(v) for v in qrels.values())
    # reference ranking: the public API + numpy
    docs = [json.loads(x) for x in (root / "corpus.jsonl").read_text().splitlines()]
    queries = {json.loads(x)["_id"]: json.loads(x)["text"] for x in (root / "queries.jsonl").read_text().splitlines()}
    m = E5(str(tiny_bert))
    demb = m.encode_passages([f"{d['title']} {d['text']}" for d in docs])
    for row in rows:
        qv = m.encode_queries([queries[row["query_id"]]])[0]
        order = [docs[j]["_id"] for j in np.argsort(-(demb @ qv), kind="stable")]
        expected = [d for d in order[2:] if d not in qrels[row["query_id"]]][:4]
        assert row["negative_ids"] == expected
        assert row["positive_id"] in qrels[row["query_id"]] and len(row["negatives"]) == 4
    # the output feeds training as it is
    assert len(load_examples(out, negatives=4)) == len(rows)


def test_filter_keeps_pairs_whose_passage_ranks_in_top_k(tiny_bert, tmp_path):
    from e5kit import E5

    f = write_data(tmp_path / "pairs.jsonl", 20, negatives=0, seed=5)
    out = tmp_path / "kept.jsonl"
    r = CliRunner().invoke(_main(), ["filter", "--input", str(f), "--output", str(out), "--top-k", "3",
                                     "--sample", "19", "--model", str(tiny_bert), "--threads", "1"])
    assert r.exit_code == 0, r.output
    pairs = [json.loads(x) for x in f.read_text().splitlines()]
    m = E5(str(tiny_bert))
    qv = m.encode_queries([p["query"] for p in pairs])
    pv = m.encode_passages([p["positive"] for p in pairs])
    scores = qv @ pv.T  # every other pair's passage is sampled (19 = all of them)
    expected = [p for i, p in enumerate(pairs) if int((scores[i] > scores[i, i]).sum()) < 3]
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert kept == expected and 0 < len(kept) < len(pairs)


def test_eval_during_training_runs_or_is_skipped_cleanly(tiny_bert, tmp_path, caplog):
    """Evaluation every N steps goes through e5kit.evaluate; without that module training still runs."""
    import importlib.util

    root = _beir(tmp_path / "beir")
    (root / "qrels" / "dev.tsv").write_text((root / "qrels" / "train.tsv").read_text())
    data = write_data(tmp_path / "d.jsonl", 8, negatives=1)
    res = train(_cfg(tiny_bert, data, tmp_path / "o", negatives=1, max_steps=2, eval_data=str(root), eval_every=1))
    rows = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert res.steps == 2 and (tmp_path / "o" / "model.safetensors").exists()
    if importlib.util.find_spec("e5kit.evaluate") is None:
        assert evals == [] and "skipping evaluation" in caplog.text
    else:
        assert [r["step"] for r in evals] == [1, 2] and all(0 <= r["eval/main_score"] <= 1 for r in evals)


def test_bad_eval_split_stops_before_step_1_and_a_failed_run_keeps_its_weights(tiny_bert, tmp_path):
    """eval data is checked before any step (the error names the flags); a failure mid-run (here the
    qrels vanish before the first evaluation) leaves checkpoint-N with the weights trained so far."""
    from e5kit.train import Trainer

    root = _beir(tmp_path / "beir")
    (root / "qrels" / "test.tsv").write_text((root / "qrels" / "train.tsv").read_text())
    data = write_data(tmp_path / "d.jsonl", 8, negatives=1)
    with pytest.raises(ValueError, match=r"--eval-split dev: .*dev.tsv is missing \(splits here: \['test', 'train'\]\)"):
        Trainer(_cfg(tiny_bert, data, tmp_path / "o", negatives=1, eval_data=str(root), eval_split="dev"))
    assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(_main(), ["train", "--data", str(data), "--model", str(tiny_bert), "--output-dir",
                                     str(tmp_path / "o"), "--eval-data", str(root), "--eval-split", "dev"])
    assert r.exit_code == 1 and "--eval-split dev" in r.output and "Traceback" not in r.output
    # no split given: dev when there is one, else test (SciFact has none)
    t = Trainer(_cfg(tiny_bert, data, tmp_path / "o", negatives=1, max_steps=3, eval_data=str(root), eval_every=2))
    assert t.eval_split == "test"
    (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(Exception, match="test.tsv is missing"):
        t.train()
    ck = tmp_path / "o" / "checkpoint-2"
    assert (ck / "model.safetensors").exists() and (ck / "trainer_state.pt").exists()
    w0 = _weights(Path(tiny_bert))
    assert any((_weights(ck)[k] - w0[k]).abs().max() > 1e-5 for k in _weights(ck))


def test_checkpoints_without_optimizer_state_are_small_and_resume(tiny_bert, tmp_path):
    data = write_data(tmp_path / "d.jsonl", 12, negatives=1)
    kw = dict(negatives=1, max_steps=3, save_every=1, save_total_limit=1)
    train(_cfg(tiny_bert, data, tmp_path / "full", **kw))
    train(_cfg(tiny_bert, data, tmp_path / "lean", save_optimizer=False, **kw))
    # rotation keeps the newest one; without AdamW's two moments the state is a few KB
    assert [d.name for d in (tmp_path / "lean").glob("checkpoint-*")] == ["checkpoint-2"]
    full = (tmp_path / "full" / "checkpoint-2" / "trainer_state.pt").stat().st_size
    lean = (tmp_path / "lean" / "checkpoint-2" / "trainer_state.pt").stat().st_size
    params = (tmp_path / "full" / "checkpoint-2" / "model.safetensors").stat().st_size
    assert full > 1.9 * params and lean < 0.02 * full
    res = train(_cfg(tiny_bert, data, tmp_path / "lean", resume="auto", save_optimizer=False, **kw))
    assert [h["step"] for h in res.history] == [3] and math.isfinite(res.history[0]["loss"])


def test_first_step_loss_equals_sentence_transformers_mnrl(tiny_mlsmall, tmp_path):
    """InfoNCE at tau = 0.01 over in-batch + hard negatives is sentence-transformers'
    MultipleNegativesRankingLoss with scale 100 on (query, positive, negative) triplets."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    data = write_data(tmp_path / "d.jsonl", 8, negatives=1, seed=4)
    res = train(_cfg(tiny_mlsmall, data, tmp_path / "o", negatives=1, batch_size=8, max_steps=1, shuffle=False,
                     dropout=0.0, query_max_length=64, passage_max_length=64))
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    st = SentenceTransformer(str(tiny_mlsmall), device="cpu").eval()  # mean pooling; MNRL's cos_sim normalises
    st.max_seq_length = 64
    feats = [st.preprocess([p + r[k] if isinstance(k, str) else p + r["negatives"][0] for r in rows])
             for p, k in (("query: ", "query"), ("passage: ", "positive"), ("passage: ", 0))]
    with torch.no_grad():
        ref = MultipleNegativesRankingLoss(st, scale=100.0)(feats, None).item()
    assert res.history[0]["loss"] == pytest.approx(ref, abs=1e-5)


def test_mine_pairs_from_a_text_corpus(tiny_bert, tmp_path):
    from e5kit import E5

    pairs = write_data(tmp_path / "pairs.jsonl", 5, negatives=0, seed=8)
    rng = random.Random(9)
    corpus = [" ".join(rng.choices(TOPIC, k=7)) for _ in range(25)]
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    corpus += [r["positive"] for r in rows]  # positives sit in the corpus and must never come back as negatives
    (tmp_path / "corpus.txt").write_text("\n".join(corpus) + "\n")
    out = tmp_path / "mined.jsonl"
    r = CliRunner().invoke(_main(), ["mine", "--input", str(pairs), "--corpus", str(tmp_path / "corpus.txt"), "-o",
                                     str(out), "-n", "3", "--skip-top", "0", "--model", str(tiny_bert)])
    assert r.exit_code == 0, r.output
    mined = [json.loads(x) for x in out.read_text().splitlines()]
    m = E5(str(tiny_bert))
    cv = m.encode_passages(corpus)
    for row, src in zip(mined, rows):
        assert row["query"] == src["query"] and row["positive"] == src["positive"]
        order = [corpus[j] for j in np.argsort(-(cv @ m.encode_queries([src["query"]])[0]), kind="stable")]
        assert row["negatives"] == [t for t in order if t != src["positive"]][:3]
