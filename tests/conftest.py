"""Shared fixtures: tiny random checkpoints built with `transformers`, the reference embedder,
and the real multilingual E5 model from ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from e5kit.evaluate import load_beir

sys.path.insert(0, str(Path(__file__).parent))
from helpers import SHARED, WORDS_PER_DOC, make_tiny_model  # noqa: E402
# CI's strict mode: skips tagged [required] fail under E5KIT_REQUIRE_SERVICES=1 (see required.py).
from required import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402, F401


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def tiny_xlmr(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-xlmr"), "xlm-roberta")


@pytest.fixture(scope="session")
def tiny_mlsmall(tmp_path_factory) -> Path:
    """BERT layout with an XLM-R-style SentencePiece vocabulary, like multilingual-e5-small."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-mlsmall"), "ml-small")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: the shared models and data live beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def ml_e5(shared_dir) -> Path:
    """The real multilingual-e5-small (4-bit copy) materialised once per machine into a cache dir."""
    return materialized_ml_e5(shared_dir)


def materialized_ml_e5(shared_dir: Path) -> Path:
    src = shared_dir / "models" / "multilingual-e5-small-q4"
    binf = src / "e5-small-q4.bin"
    if not binf.exists():
        pytest.skip(f"{binf} is absent")
    h = hashlib.sha256(binf.read_bytes()).hexdigest()[:16]
    root = Path(os.environ.get("E5KIT_TEST_CACHE", Path.home() / ".cache" / "e5kit-tests"))
    out = root / f"multilingual-e5-small-q4-{h}"
    if not (out / "model.safetensors").exists():
        tmp = root / f".tmp-{h}-{os.getpid()}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(src / "materialize.py"), str(binf), str(tmp)], check=True)
        try:
            tmp.rename(out)
        except OSError:  # another process got there first
            pass
    return out


@pytest.fixture(scope="session")
def scifact(shared_dir) -> Path:
    return shared_dir / "data" / "scifact"


EXTRA_DOCS = 150


@pytest.fixture(scope="session")
def scifact_subset(tmp_path_factory, scifact) -> Path:
    """All 300 SciFact test queries, their relevant documents and a fixed random sample of others, in
    BEIR layout (documents cut short): the one SciFact subset of the retrieval-quality tests."""
    out = tmp_path_factory.mktemp("subset") / "scifact"  # the folder name gives the task name
    out.mkdir()
    data = load_beir(scifact, "test")
    relevant = sorted({d for docs in data.qrels.values() for d in docs})
    others = sorted(set(data.corpus) - set(relevant))
    keep = set(relevant) | set(random.Random(0).sample(others, EXTRA_DOCS))
    with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in data.corpus:
            if d in keep:
                title, text = data.corpus[d]
                f.write(json.dumps({"_id": d, "title": title, "text": " ".join(text.split()[:WORDS_PER_DOC])}) + "\n")
    with open(out / "queries.jsonl", "w", encoding="utf-8") as f:
        for q, text in data.queries.items():
            f.write(json.dumps({"_id": q, "text": text}) + "\n")
    (out / "qrels").mkdir()
    with open(out / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, docs in data.qrels.items():
            for d, r in docs.items():
                f.write(f"{q}\t{d}\t{r}\n")
    return out

