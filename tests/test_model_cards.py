"""The model cards' published numbers, run wherever the real checkpoints sit in the local Hugging Face
cache (HF_HUB_OFFLINE=1); skipped otherwise (this project's machines cannot download them)."""

import numpy as np
import pytest

from card_examples import EN_PASSAGES, EN_QUERIES, INSTRUCT_SCORES, INSTRUCT_TASK, ML_PASSAGES, ML_QUERIES
from e5kit import E5


def _cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = [try_to_load_from_cache(repo_id, f) for f in ("config.json", "tokenizer.json", "model.safetensors")]
    return all(isinstance(f, str) for f in found)


def _load(repo_id, monkeypatch):
    if not _cached(repo_id):
        pytest.skip(f"{repo_id} is not in the local Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return E5(repo_id, device="cpu", dtype="float32")


def test_multilingual_e5_large_instruct_card_scores(monkeypatch):
    model = _load("intfloat/multilingual-e5-large-instruct", monkeypatch)
    scores = model.similarity(model.encode_queries(ML_QUERIES, task=INSTRUCT_TASK), model.encode_passages(ML_PASSAGES))
    assert np.allclose(scores, INSTRUCT_SCORES, atol=0.01)


def test_e5_small_v2_card_ranking(monkeypatch):
    model = _load("intfloat/e5-small-v2", monkeypatch)
    scores = model.similarity(model.encode_queries(EN_QUERIES), model.encode_passages(EN_PASSAGES))
    assert list(scores.argmax(axis=1)) == [0, 1]
