"""sentence-transformers' method and argument names on E5, with ST's semantics (checked against ST
itself), the task= warning, and the automatic progress bar by expected time."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch

from e5kit import E5

TEXTS = ["how much protein should a female eat", "summit define"]


def test_sentence_transformers_names_and_semantics(tiny_mlsmall):
    from sentence_transformers import SentenceTransformer

    m, st = E5(str(tiny_mlsmall)), SentenceTransformer(str(tiny_mlsmall), device="cpu")
    assert m.get_sentence_embedding_dimension() == st.get_embedding_dimension() == m.dim
    assert m.max_seq_length == 512 and m.tokenizer.encode("summit").ids == m.tokenize(["summit"])[0]
    # prompt: literal text in front, as ST; prompt_name: the model's own convention, never twice
    ref = st.encode(TEXTS, prompt="query: ", normalize_embeddings=True)
    np.testing.assert_allclose(m.encode(TEXTS, prompt="query: "), ref, atol=1e-5)
    np.testing.assert_allclose(m.encode(TEXTS, prompt_name="query"), m.encode_queries(TEXTS), atol=1e-6)
    np.testing.assert_allclose(m.encode(["passage: a"], prompt_name="document"), m.encode_passages(["a"]), atol=1e-6)
    np.testing.assert_allclose(m.encode_query(TEXTS), m.encode_queries(TEXTS), atol=1e-6)
    np.testing.assert_allclose(m.encode_document(TEXTS), m.encode_passages(TEXTS), atol=1e-6)
    np.testing.assert_allclose(m.encode_query(TEXTS, prompt="passage: "), m.encode_passages(TEXTS), atol=1e-6)
    with pytest.raises(ValueError, match="prompt_name must be one of"):
        m.encode(TEXTS, prompt_name="classification")
    # truncate_dim: the first N dimensions, re-normalised, as ST with normalize_embeddings=True
    short = m.encode_queries(TEXTS, truncate_dim=16)
    ref = st.encode(TEXTS, prompt="query: ", truncate_dim=16, normalize_embeddings=True)
    assert short.shape == (2, 16)
    np.testing.assert_allclose(short, ref, atol=1e-5)
    # convert_to_numpy=False: a list of tensors, as ST
    as_list = m.encode_queries(TEXTS, convert_to_numpy=False)
    assert isinstance(as_list, list) and all(isinstance(t, torch.Tensor) for t in as_list)
    np.testing.assert_allclose(torch.stack(as_list).numpy(), m.encode_queries(TEXTS), atol=1e-7)


def test_task_on_a_non_instruct_model_warns(tiny_bert):
    m = E5(str(tiny_bert))
    with pytest.warns(UserWarning, match="task= is ignored"):
        v = m.encode_queries(TEXTS, task="SciFact")
    np.testing.assert_allclose(v, m.encode_queries(TEXTS), atol=1e-7)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("after_s, shown", [(0.0, True), (1e9, False)])
def test_progress_bar_by_expected_time(tiny_bert, monkeypatch, after_s, shown):
    """On a terminal the bar appears once the job is expected to take over PROGRESS_AFTER_S, even
    for 40 inputs (it used to need 2,048)."""
    import e5kit.engine as engine

    m = E5(str(tiny_bert))
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(engine, "PROGRESS_AFTER_S", after_s)
    m.encode_passages(["the cell study of gene and cancer risk"] * 40, batch_size=4)
    assert ("embedding" in term.getvalue()) is shown
