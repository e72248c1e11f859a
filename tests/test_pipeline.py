"""The one text-to-vector pipeline (prepare -> embed -> finish) and its promises: the same vectors
as ``encode*``, per-call results, and no change to torch's process-wide settings unless asked."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

from e5kit import E5, TruncationWarning
from e5kit.pipeline import Prepared, finish, quantize_embeddings
from helpers import reference_embed
from test_train import _beir, _cfg, write_data

TEXTS = ["how much protein should a female eat", "summit define", "the cdc guideline for women is 46 grams a day"]


def test_prepare_embed_finish_is_encode(tiny_bert):
    m = E5(str(tiny_bert))
    p = m.prepare(TEXTS, "passage")
    assert p.texts == ["passage: " + t for t in TEXTS] and p.truncated == [] and len(p) == 3
    assert p.n_tokens == sum(len(s) for s in p.ids)
    pooled = m.embed(p)
    assert pooled.dtype == torch.float32 and pooled.shape == (3, m.dim)
    assert not torch.allclose(pooled.norm(dim=1), torch.ones(3))  # unnormalised until finish
    np.testing.assert_array_equal(finish(pooled), m.encode_passages(TEXTS))
    np.testing.assert_array_equal(finish(pooled, normalize=False), m.encode_passages(TEXTS, normalize_embeddings=False))
    np.testing.assert_allclose(finish(pooled, normalize=False), reference_embed(tiny_bert, p.texts, normalize=False),
                               atol=1e-5)
    # raw input is used as given; the query convention is the model's
    assert m.prepare(TEXTS, None).texts == TEXTS
    assert m.prepare(["x"], "query").texts == ["query: x"]
    assert m.prepare(["x"], "query", prompt_style="instruct", task="SciFact").texts[0].startswith("Instruct: ")


def test_prepare_ids_and_max_tokens(tiny_bert):
    m = E5(str(tiny_bert))
    long = " ".join(["protein"] * 100)
    p = m.prepare([long, "summit"], "passage", max_tokens=16)
    assert p.truncated == [0] and len(p.ids[0]) == 16 and p.ids[0][-1] == m.prepare(["a"]).ids[0][-1]  # [SEP] kept
    with pytest.raises(Exception, match="16"):
        m.prepare([long], "passage", max_tokens=16, truncate=False)
    q = m.prepare_ids(p.ids, max_tokens=8)
    assert q.texts is None and q.truncated == [0] and len(q.ids[0]) == 8 and q.ids[1] == p.ids[1]
    # cut ids keep their closing [SEP], as cut text does: the same ids as the text cut at 8
    assert q.ids[0] == m.prepare([long], "passage", max_tokens=8).ids[0]
    assert m.prepare_ids([p.ids[0][:-1]], max_tokens=8).ids[0] == p.ids[0][:8]  # no [SEP] at the end: a plain cut
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.prepare_ids([[10**9]])


def test_prepare_spans(tiny_bert):
    """With spans=True, prepare also gives each token's piece and offsets in the text the model saw
    (what the server's /tokenize shows), for the same (cut) ids."""
    m = E5(str(tiny_bert))
    long = " ".join(["protein"] * 100)
    p = m.prepare(["summit define", long], "query", spans=True, max_tokens=16)
    assert m.prepare(["x"]).spans is None and p.ids == m.prepare(["summit define", long], "query", max_tokens=16).ids
    for text, ids, sp in zip(p.texts, p.ids, p.spans):
        assert len(sp.pieces) == len(sp.offsets) == len(sp.special) == len(ids)
        assert sp.special[0] and sp.special[-1] and not any(sp.special[1:-1])
        assert [text[a:b] for a, b in sp.offsets[1:-1]] == [w.lstrip("#") for w in sp.pieces[1:-1]]
    assert [p.texts[0][a:b] for a, b in p.spans[0].offsets[1:-1]] == ["query", ":", "summit", "define"]


def test_finish_dimensions_and_precision():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 16)).astype(np.float32)
    out = finish(v, dimensions=8)
    assert out.shape == (5, 8) and np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(out, finish(v[:, :8]), atol=1e-6)  # Matryoshka: cut then renormalise
    np.testing.assert_array_equal(finish(v, normalize=False, dimensions=8), v[:, :8])
    unit = finish(v)
    np.testing.assert_array_equal(finish(v, precision="ubinary"), quantize_embeddings(unit, "ubinary"))
    ranges = np.stack([-np.ones(16, np.float32), np.ones(16, np.float32)])
    np.testing.assert_array_equal(finish(v, precision="int8", ranges=ranges), quantize_embeddings(unit, "int8", ranges))
    for bad in (0, 17, True):
        with pytest.raises(ValueError, match="dimensions"):
            finish(v, dimensions=bad)
    with pytest.raises(ValueError, match="precision"):
        finish(v, precision="int4")


def test_truncated_indices_are_per_call_and_per_thread(tiny_bert):
    m = E5(str(tiny_bert))
    long = " ".join(["protein"] * 600)
    seen: dict[str, list[int]] = {}

    def worker():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TruncationWarning)
            m.encode_passages(["short", long])
        seen["thread"] = m.last_truncated

    with pytest.warns(TruncationWarning):
        m.encode_passages([long, "short", long])
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert m.last_truncated == [0, 2] and seen["thread"] == [1]
    assert m.prepare([long], "passage").truncated == [0]  # the call returns its own


def test_library_leaves_torch_threads_alone(tiny_bert):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        E5(str(tiny_bert)).encode_queries(TEXTS)
        assert torch.get_num_threads() == 1
        E5(str(tiny_bert), threads=2)  # asked for: changed
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_trainer_evaluation_keeps_the_callers_thread_setting(tiny_bert, tmp_path):
    """The trainer's evaluation builds an engine over the training weights; it must not reset
    the thread count the caller chose (it used to, on every evaluation)."""
    from e5kit.train import train

    pytest.importorskip("pytrec_eval")
    root = _beir(tmp_path / "beir")
    (root / "qrels" / "dev.tsv").write_text((root / "qrels" / "train.tsv").read_text())
    data = write_data(tmp_path / "d.jsonl", 8, negatives=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        res = train(_cfg(tiny_bert, data, tmp_path / "o", negatives=1, max_steps=2, eval_data=str(root),
                         eval_every=1, threads=None))
        assert res.steps == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_prepared_is_plain_data():
    p = Prepared(ids=[[1, 2], [3]], truncated=[1])
    assert p.n_tokens == 3 and len(p) == 2 and p.texts is None
