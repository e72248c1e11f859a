"""Our encoder vs the reference (transformers AutoModel + average_pool + F.normalize)."""

import warnings

import numpy as np
import pytest
import torch

from e5kit import E5, InputTooLongError, TruncationWarning, quantize_embeddings
from helpers import PARITY_TEXTS, reference_embed

KINDS = ["tiny_bert", "tiny_xlmr", "tiny_mlsmall"]


@pytest.fixture(params=KINDS)
def tiny(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("batch_size,budget", [(32, 16384), (3, 16384), (1, 16384), (32, 600)])
def test_fp32_parity(tiny, batch_size, budget):
    ref = reference_embed(tiny, PARITY_TEXTS)
    model = E5(str(tiny))
    with pytest.warns(TruncationWarning):
        ours = model.encode(PARITY_TEXTS, batch_size=batch_size, max_batch_tokens=budget)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-5


def test_unnormalized_parity(tiny):
    ref = reference_embed(tiny, PARITY_TEXTS, normalize=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ours = E5(str(tiny)).encode(PARITY_TEXTS, normalize_embeddings=False)
    assert np.abs(ours - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max())
    assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0)


def test_bf16_cosine(tiny):
    ref = reference_embed(tiny, PARITY_TEXTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TruncationWarning)
        ours = E5(str(tiny), dtype="bfloat16").encode(PARITY_TEXTS)
    assert ours.dtype == np.float32
    assert (ours * ref).sum(axis=1).min() >= 0.999


def test_truncation_reported_and_refusable(tiny_bert):
    model = E5(str(tiny_bert))
    long_text = PARITY_TEXTS[6]
    with pytest.warns(TruncationWarning, match="1 of 2 inputs"):
        model.encode(["short", long_text])
    assert model.last_truncated == [1]
    assert len(model.tokenize([long_text])[0]) == 512
    with pytest.raises(InputTooLongError, match=r"input 1 has \d+ tokens.*512") as e:
        model.encode(["short", long_text], truncate=False)
    assert e.value.index == 1 and e.value.n_tokens > 512
    model.encode(["short"], truncate=False)
    assert model.last_truncated == []


def test_query_passage_helpers_match_prefixed_encode(tiny_bert):
    model = E5(str(tiny_bert))
    texts = ["how much protein should a female eat", "summit define"]
    q = model.encode_queries(texts)
    p = model.encode_passages(texts)
    assert np.array_equal(q, model.encode([f"query: {t}" for t in texts]))
    assert np.array_equal(p, model.encode([f"passage: {t}" for t in texts]))
    # No double prefix: a prefixed input embeds as that same text alone (a batch of one: other
    # batch shapes may differ in the last bits on some CPUs' GEMM blockings).
    once = model.encode_queries(["query: summit define"])
    assert np.array_equal(once, model.encode(["query: summit define"]))
    np.testing.assert_allclose(once, q[1:], atol=1e-6)
    assert not np.allclose(q, p)


def test_instruct_style(tiny_xlmr):
    model = E5(str(tiny_xlmr), prompt_style="instruct")
    q = model.encode_queries(["how much protein"], task="SciFact")
    ref = reference_embed(tiny_xlmr, model.format(["how much protein"], "query", "SciFact"))
    assert np.abs(q - ref).max() <= 1e-5
    assert np.array_equal(model.encode_passages(["doc text"]), model.encode(["doc text"]))


def test_output_forms_and_similarity(tiny_bert):
    model = E5(str(tiny_bert))
    one = model.encode("hello world")
    assert one.shape == (model.dim,)
    t = model.encode(["hello world"], convert_to_tensor=True)
    assert isinstance(t, torch.Tensor) and torch.equal(t[0], torch.from_numpy(one))
    assert model.encode([]).shape == (0, model.dim)
    a = model.encode(["a b c", "protein"])
    sim = model.similarity(a, a)
    assert sim.shape == (2, 2)
    assert np.allclose(np.diag(sim), 100.0, atol=1e-3)
    assert np.allclose(sim, 100 * a @ a.T, atol=1e-3)


@pytest.mark.parametrize("precision", ["int8", "uint8", "binary", "ubinary"])
def test_precision_matches_sentence_transformers(tiny_bert, precision):
    try:
        from sentence_transformers.util.quantization import quantize_embeddings as st_quantize
    except ImportError:  # older sentence-transformers
        from sentence_transformers.quantization import quantize_embeddings as st_quantize

    model = E5(str(tiny_bert))
    texts = ["the cell", "gene study", "protein", "a", "cancer risk in patients", "summit define"]
    emb = model.encode(texts)
    ours = model.encode(texts, precision=precision)
    ref = st_quantize(emb, precision=precision)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.abs(ours.astype(np.int32) - ref.astype(np.int32)).max() <= 1  # float rounding at bucket edges
    assert np.array_equal(quantize_embeddings(emb, precision), ours)


def test_bad_inputs(tiny_bert):
    model = E5(str(tiny_bert))
    with pytest.raises(TypeError, match="input 1"):
        model.encode(["ok", None])
    with pytest.raises(ValueError, match="precision"):
        model.encode(["ok"], precision="fp8")
    with pytest.raises(ValueError, match="dtype"):
        E5(str(tiny_bert), dtype="float64")
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        E5(str(tiny_bert), device="cpu", dtype="float16")
