"""`e5kit eval` and the evaluation API: SciFact nDCG@10 with the real multilingual E5 model equals a
reference built from transformers + exact search + pytrec_eval; STS likewise; the CLI writes
MTEB-layout results and a self-contained report; the MTEB adapter runs under mteb.evaluate."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval
from click.testing import CliRunner

from e5kit import E5
from e5kit.cli import main
from e5kit.evaluate import E5ForMTEB, evaluate_retrieval, evaluate_sts, load_beir
from e5kit.prompts import beir_document

sys.path.insert(0, str(Path(__file__).parent))
from helpers import SHARED, WORDS_PER_DOC, reference_embed  # noqa: E402

@pytest.fixture(scope="module")
def tiny_beir(tmp_path_factory, scifact_subset) -> Path:
    """30 SciFact queries and 60 documents: enough for the CLI plumbing with a random tiny model."""
    out = tmp_path_factory.mktemp("tiny") / "scifact"
    (out / "qrels").mkdir(parents=True)
    qrels_lines = (scifact_subset / "qrels" / "test.tsv").read_text().splitlines()
    queries = [json.loads(x) for x in (scifact_subset / "queries.jsonl").read_text().splitlines()][:30]
    keep_q = {q["_id"] for q in queries}
    kept = [ln for ln in qrels_lines[1:] if ln.split("\t")[0] in keep_q]
    (out / "qrels" / "test.tsv").write_text("\n".join(qrels_lines[:1] + kept) + "\n")
    (out / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    rel = {ln.split("\t")[1] for ln in kept}
    docs = [json.loads(x) for x in (scifact_subset / "corpus.jsonl").read_text().splitlines()]
    docs = [d for d in docs if d["_id"] in rel] + [d for d in docs if d["_id"] not in rel][:60 - len(rel)]
    (out / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return out


def reference_retrieval(model_dir: Path, folder: Path) -> dict[str, float]:
    """The E5 model card recipe end to end: transformers embeddings, brute-force ranking, pytrec_eval."""
    data = load_beir(folder, "test")
    doc_ids, q_ids = list(data.corpus), list(data.queries)
    d = reference_embed(model_dir, ["passage: " + beir_document(*data.corpus[i]) for i in doc_ids], batch_size=32)
    q = reference_embed(model_dir, ["query: " + data.queries[i] for i in q_ids], batch_size=64)
    s = q @ d.T
    run = {}
    for qi, qid in enumerate(q_ids):
        top = np.argsort(-s[qi])[:100]
        run[qid] = {doc_ids[j]: float(s[qi, j]) for j in top}
    ev = pytrec_eval.RelevanceEvaluator(data.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    return {"ndcg_at_10": float(np.mean([v["ndcg_cut_10"] for v in ev.values()])),
            "recall_at_100": float(np.mean([v["recall_100"] for v in ev.values()]))}


@pytest.mark.slow
def test_scifact_ndcg_matches_reference(ml_e5, scifact_subset, record_property, capsys):
    model = E5(str(ml_e5))
    ours = evaluate_retrieval(model, scifact_subset)
    ref = reference_retrieval(ml_e5, scifact_subset)
    n_docs = ours.details["n_documents"]
    assert ours.details["n_queries"] == 300 and n_docs == len(load_beir(scifact_subset).corpus)
    assert ours.task_name == "SciFact"
    assert abs(ours.scores["ndcg_at_10"] - ref["ndcg_at_10"]) < 1e-4
    assert abs(ours.scores["recall_at_100"] - ref["recall_at_100"]) < 1e-4
    assert ours.scores["main_score"] == ours.scores["ndcg_at_10"]
    line = (f"SciFact subset (300 queries, {n_docs} docs cut to {WORDS_PER_DOC} words): nDCG@10 "
            f"{100 * ours.scores['ndcg_at_10']:.2f} (reference {100 * ref['ndcg_at_10']:.2f}); the no-prefix "
            "ablation is benchmarks/bench_eval.py --styles e5,none")
    record_property("scifact_subset", line)
    with capsys.disabled():
        print("\n" + line)


@pytest.mark.slow
def test_sts_spearman_matches_reference(ml_e5, shared_dir, tmp_path):
    from scipy.stats import spearmanr

    src = shared_dir / "data" / "stsbenchmark" / "sts-test.csv"
    lines = src.read_text(encoding="utf-8").splitlines()[:120]
    (tmp_path / "sts-test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = evaluate_sts(E5(str(ml_e5)), tmp_path / "sts-test.csv", task_name="STSBenchmark")
    rows = [ln.split("\t") for ln in lines]
    a = reference_embed(ml_e5, ["query: " + r[5] for r in rows])
    b = reference_embed(ml_e5, ["query: " + r[6] for r in rows])
    expected = spearmanr([float(r[4]) for r in rows], np.sum(a * b, axis=1)).statistic
    assert run.scores["cosine_spearman"] == pytest.approx(expected, abs=1e-4)
    assert run.details["n_pairs"] == 120


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory) -> tuple[Path, Path]:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    out = tmp_path_factory.mktemp("small-sets")
    lines = (SHARED / "data" / "stsbenchmark" / "sts-test.csv").read_text(encoding="utf-8").splitlines()[:80]
    (out / "stsbenchmark").mkdir()
    (out / "stsbenchmark" / "sts-test.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    clf = out / "banking77"
    clf.mkdir()
    for split, per_label in (("train", 10), ("test", 3)):
        with open(SHARED / "data" / "banking77" / f"{split}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        labels = sorted({r["category"] for r in rows})[:12]
        picked = [r for lb in labels for r in [x for x in rows if x["category"] == lb][:per_label]]
        with open(clf / f"{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["text", "category"])
            w.writeheader()
            w.writerows(picked)
    return out / "stsbenchmark", clf


@pytest.mark.slow
def test_eval_cli_writes_mteb_results_and_report(tiny_mlsmall, tiny_beir, small_sets, tmp_path):
    sts, clf = small_sets
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["eval", "-m", str(tiny_mlsmall), "--beir", str(tiny_beir), "--sts", str(sts),
                                  "--classification", str(clf), "--ablate-prefix", "--n-experiments", "3",
                                  "-o", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (out / "results").iterdir())
    assert len(runs) == 2 and any("no_prefix" in n for n in runs)
    with_prefix = next(p for p in (out / "results").iterdir() if "no_prefix" not in p.name)
    sci = json.loads((with_prefix / "SciFact.json").read_text())
    entry = sci["scores"]["test"][0]
    assert entry["main_score"] == entry["ndcg_at_10"] and entry["hf_subset"] == "default"
    # the numbers in the file are the API's numbers
    api = evaluate_retrieval(E5(str(tiny_mlsmall)), tiny_beir)
    assert entry["ndcg_at_10"] == pytest.approx(api.scores["ndcg_at_10"], abs=1e-9)
    bank = json.loads((with_prefix / "Banking77Classification.json").read_text())["scores"]["test"][0]
    assert len(bank["scores_per_experiment"]) == 3 and 0 <= bank["full_train_accuracy"] <= 1
    assert bank["main_score"] == bank["accuracy"]
    stsb = json.loads((with_prefix / "STSBenchmark.json").read_text())["scores"]["test"][0]
    assert stsb["main_score"] == stsb["cosine_spearman"]
    try:  # mteb's own loader accepts the files when mteb is installed
        from mteb.results import TaskResult

        for f in ("SciFact.json", "STSBenchmark.json", "Banking77Classification.json"):
            assert TaskResult.from_disk(with_prefix / f).task_name == f.removesuffix(".json")
    except ImportError:
        pass
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "src='http" not in page and "(no prefix)" in page
    md = (out / "report.md").read_text()
    assert "ndcg_at_10" in md and "recall_at_100" in md and "(no prefix)" in md
    for name in [ln.split("](")[1].rstrip(")") for ln in md.splitlines() if ln.startswith("![")]:
        assert (out / name).stat().st_size > 1000
    # a later run compared with this one
    r2 = CliRunner().invoke(main, ["eval", "-m", str(tiny_mlsmall), "--sts", str(sts), "--label", "again",
                                   "--compare", str(with_prefix), "-o", str(tmp_path / "out2")])
    assert r2.exit_code == 0, r2.output
    md2 = (tmp_path / "out2" / "report.md").read_text()
    header = next(ln for ln in md2.splitlines() if ln.startswith("| task"))
    assert "again" in header and Path(tiny_mlsmall).name in header  # a local model is named by its folder


def test_eval_relative_model_path_names_a_visible_run(tiny_mlsmall, small_sets, tmp_path, monkeypatch):
    """`eval -m ./my-e5`: the run folder and the report are named after the model folder (once this was
    a hidden `.__my-e5`)."""
    shutil.copytree(tiny_mlsmall, tmp_path / "my-e5")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["eval", "-m", "./my-e5", "--sts", str(small_sets[0]), "-o", "out"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "out" / "results").iterdir()] == ["my-e5"]
    assert (tmp_path / "out" / "results" / "my-e5" / "STSBenchmark.json").exists()
    header = next(ln for ln in (tmp_path / "out" / "report.md").read_text().splitlines() if ln.startswith("| task"))
    assert "my-e5" in header and "./" not in header


def test_eval_cli_errors(tmp_path):
    (tmp_path / "bad").mkdir()
    r = CliRunner().invoke(main, ["eval", "-o", str(tmp_path / "o")])
    assert r.exit_code != 0 and "at least one of" in r.output


def test_mteb_adapter_prompts_and_protocol(tiny_bert):
    model = E5(str(tiny_bert))
    adapter = E5ForMTEB(model)
    texts = ["cancer risk in patients", "the cell study"]

    class Meta:  # what mteb passes: a TaskMetadata with a name and a type
        def __init__(self, name, type):
            self.name, self.type = name, type

    retrieval = Meta("SciFact", "Retrieval")
    np.testing.assert_allclose(adapter.encode([{"text": texts}], task_metadata=retrieval, hf_split="test",
                                              hf_subset="default", prompt_type="query"),
                               model.encode_queries(texts), atol=1e-6)
    np.testing.assert_allclose(adapter.encode(texts, task_name="SciFact", prompt_type="document"),
                               model.encode_passages(texts), atol=1e-6)
    clf = adapter.encode(texts, task_metadata=Meta("Banking77Classification", "Classification"),
                         hf_split="test", hf_subset="default")
    np.testing.assert_allclose(clf, model.encode(["query: " + t for t in texts], normalize_embeddings=False), atol=1e-5)
    assert adapter.format(texts, "document", "SciFact") == ["passage: " + t for t in texts]
    instruct = E5ForMTEB(model, prompt_style="instruct")
    assert instruct.format(["q"], "query", "SciFact") == [
        "Instruct: Given a scientific claim, retrieve documents that support or refute the claim\nQuery: q"]
    assert instruct.format(["d"], "document", "SciFact") == ["d"]
    sim = adapter.similarity(clf, clf)
    assert sim.shape == (2, 2) and np.allclose(np.diag(sim), 1, atol=1e-6)
    assert np.allclose(adapter.similarity_pairwise(clf, clf), 1, atol=1e-6)


def test_mteb_evaluate_runs_offline(tiny_bert):
    mteb = pytest.importorskip("mteb", reason="mteb is not installed")
    from mteb.mocks.mock_tasks.classification import MockClassificationTask
    from mteb.mocks.mock_tasks.retrieval import MockRetrievalTask
    from mteb.mocks.mock_tasks.sts import MockSTSTask
    from mteb.models.models_protocols import EncoderProtocol

    adapter = E5ForMTEB(str(tiny_bert))
    assert isinstance(adapter, EncoderProtocol)
    assert adapter.mteb_model_meta.embed_dim in (None, 32)
    result = mteb.evaluate(adapter, tasks=[MockRetrievalTask(), MockSTSTask(), MockClassificationTask()],
                           cache=None, show_progress_bar=False)
    scores = {tr.task_name: tr.get_score() for tr in result.task_results}
    assert set(scores) == {"MockRetrievalTask", "MockSTSTask", "MockClassificationTask"}
    assert all(np.isfinite(v) for v in scores.values())
