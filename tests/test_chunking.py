"""e5kit.chunk and long text: token-exact windows that fit 512 tokens with the prefix, spans that
cover the text, the overlap asked for, boundaries; encode_passages(long=...); indexes of chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e5kit import E5, Index, chunk
from e5kit.prompts import format_text

WORDS = "the cell study gene cancer risk patients protein women day marathon mountain leaders government".split()


def words(n: int, seed: int = 0) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, n))


def prose(n_sentences: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_sentences):
        out.append(" ".join(rng.choice(WORDS, int(rng.integers(5, 25)))).capitalize() + ".")
        if i % 7 == 6:
            out.append("\n\n")
    return " ".join(out).replace(" \n\n ", "\n\n")


@pytest.fixture(scope="module")
def bert(tiny_bert):
    return E5(str(tiny_bert))


@pytest.fixture(scope="module")
def real(ml_e5):
    return E5(str(ml_e5))


def seen_tokens(model: E5, c) -> int:
    """Tokens the model reads for a chunk, counted independently (prefix and specials included)."""
    seen = format_text(c.text, "passage", model.prompt_style)
    return len(model.engine.tokenize([seen], truncate=False).ids[0])  # raises if it were over 512


def tokens_of(model: E5, text: str) -> int:
    return model.engine.count_tokens([text])[0] - 2  # without [CLS] / [SEP]


def check_chunks(model: E5, text: str, chunks, overlap: int) -> None:
    assert chunks and chunks[0].span[0] == 0 and chunks[-1].span[1] == len(text)
    for c in chunks:
        assert seen_tokens(model, c) == c.n_tokens <= model.max_tokens
        assert c.text.endswith(text[c.span[0]:c.span[1]])
    for a, b in zip(chunks, chunks[1:]):
        assert a.span[0] < b.span[0] <= a.span[1]  # progress, and no gap between neighbours
    if overlap == 0:
        assert "".join(text[s:e] for s, e in (c.span for c in chunks)) == text


@pytest.mark.parametrize("overlap", [0, 32, 100])
def test_windows_fit_and_spans_cover(bert, overlap):
    text = prose(400)
    chunks = chunk(text, bert, overlap=overlap)
    assert len(chunks) >= 4
    check_chunks(bert, text, chunks, overlap)
    assert min(c.n_tokens for c in chunks[:-1]) > 0.7 * bert.max_tokens  # windows are used, not tiny
    for a, b in zip(chunks, chunks[1:]):
        shared = tokens_of(bert, text[b.span[0]:a.span[1]])
        assert overlap <= shared <= overlap + 16, (overlap, shared)  # as asked, moved back to a word start


def test_cuts_prefer_paragraphs_and_sentences(bert):
    text = prose(400, seed=3)
    chunks = chunk(text, bert, overlap=0)
    for c in chunks[:-1]:
        assert text[c.span[0]:c.span[1]].rstrip()[-1] == "."  # a sentence always exists near the end
    para = sum(text[c.span[0]:c.span[1]].endswith("\n\n") for c in chunks[:-1])
    assert para >= 1  # a paragraph break in the last quarter of a window wins over a sentence end


def test_one_token_exactly_512_and_513(bert):
    overhead = bert.engine.count_tokens(["passage: "])[0]  # [CLS] passage : [SEP]
    for n_words, n_chunks in [(1, 1), (512 - overhead, 1), (513 - overhead, 2)]:
        text = words(n_words)
        assert bert.engine.count_tokens(["passage: " + text])[0] == n_words + overhead
        chunks = chunk(text, bert, overlap=0)
        assert len(chunks) == n_chunks, n_words
        check_chunks(bert, text, chunks, 0)
    assert chunk(words(512 - overhead), bert)[0].n_tokens == 512


def test_unicode_whitespace_and_empty(real):
    for text in ["", "   ", " \n\t\n ", "a"]:
        chunks = chunk(text, real)
        assert len(chunks) == 1 and chunks[0].span == (0, len(text))
    text = ("東京は日本の首都です。南瓜のスープ 🎃 は美味しい。Ünïcödé façade naïve café. " * 60).strip()
    for overlap in (0, 16):
        chunks = chunk(text, real, overlap=overlap)
        assert len(chunks) >= 3
        check_chunks(real, text, chunks, overlap)


def test_titles_and_options(bert):
    text = prose(150)
    title = "marathon mountain"
    every = chunk([text], bert, titles=[title], overlap=0)[0]
    assert all(c.text.startswith(title + " ") for c in every)
    check_chunks(bert, text, every, 0)
    first = chunk([text], bert, titles=[title], repeat_title=False, overlap=0)[0]
    assert first[0].text.startswith(title) and not first[1].text.startswith(title)
    small = chunk(text, bert, max_tokens=64, overlap=8)
    assert max(c.n_tokens for c in small) <= 64 and len(small) > len(every)
    with pytest.raises(ValueError, match="overlap"):
        chunk(text, bert, max_tokens=32, overlap=40)
    with pytest.raises(ValueError, match="titles"):
        chunk(["a", "b"], bert, titles=["x"])
    multi = chunk(["a b", text], bert)
    assert len(multi) == 2 and multi[1][0].doc == 1 and [c.index for c in multi[1]] == list(range(len(multi[1])))


def test_encode_passages_long_modes(bert):
    texts = [prose(150, seed=1), "protein women day", prose(60, seed=2)]
    with pytest.warns(UserWarning, match="truncated"):
        truncated = bert.encode_passages(texts)
    assert truncated.shape == (3, bert.dim)
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_array_equal(truncated, bert.encode_passages(texts, long="truncate"))
    chunks = bert.encode_passages(texts, long="chunks", chunk_overlap=32)
    expected = chunk(texts, bert, overlap=32)
    assert [c.span for c in chunks.chunks] == [c.span for cs in expected for c in cs]
    assert list(chunks.doc) == [d for d, cs in enumerate(expected) for _ in cs]
    # each chunk vector is the plain passage embedding of that chunk's text
    np.testing.assert_allclose(chunks.vectors, bert.encode_passages([c.text for c in chunks.chunks]), atol=1e-5)
    mean = bert.encode_passages(texts, long="mean", chunk_overlap=32)
    for d in range(3):
        m = chunks.vectors[chunks.doc == d].mean(axis=0)
        np.testing.assert_allclose(mean[d], m / np.linalg.norm(m), atol=1e-5)
    np.testing.assert_allclose(mean[1], truncated[1], atol=1e-5)  # a short text is its own single chunk
    assert bert.encode_passages(texts[0], long="mean").shape == (bert.dim,)
    with pytest.raises(ValueError, match="long must be"):
        bert.encode_passages(texts, long="split")


def test_index_of_chunks_ranks_documents(tmp_path, bert):
    rng = np.random.default_rng(0)
    docs = {f"doc{i}": prose(int(rng.integers(20, 120)), seed=10 + i) for i in range(8)}
    idx = Index(bert, chunked=True)
    idx.add_documents(list(docs), list(docs.values()), metadata=[{"n": i, "text": t} for i, t in enumerate(docs.values())])
    assert len(idx.documents()) == 8 and len(idx) > 8
    query = "cancer risk in women"
    q = bert.encode_queries(query)
    enc = bert.encode_passages(list(docs.values()), long="chunks")
    ids = list(docs)
    for aggregate in ("max", "sum", "mean"):
        hits = idx.search(query, k=5, aggregate=aggregate, top_chunks=2)
        per_doc = {}
        for d in range(len(ids)):
            sc = np.sort(enc.vectors[enc.doc == d] @ q)[::-1]
            per_doc[ids[d]] = {"max": sc[0], "sum": sc[:2].sum(), "mean": sc[:2].mean()}[aggregate]
        expected = sorted(per_doc, key=lambda d: -per_doc[d])[:5]
        assert [h.id for h in hits] == expected, aggregate
        np.testing.assert_allclose([h.score for h in hits], [per_doc[d] for d in expected], atol=1e-5)
    best = idx.search(query, k=1)[0]
    s, e = best.span
    assert best.highlight == docs[best.id][s:e] and best.metadata == {"n": ids.index(best.id)}
    idx.save(tmp_path / "ix")
    loaded = Index.load(tmp_path / "ix", bert)
    assert loaded.chunked and loaded.search(query, k=5) == idx.search(query, k=5)
    assert loaded.delete_documents([best.id]) == 1
    assert best.id not in [h.id for h in loaded.search(query, k=8)] and len(loaded.documents()) == 7
    with pytest.raises(ValueError, match="already in the index"):
        idx.add_documents([ids[0]], ["again"])
    with pytest.raises(ValueError, match="add_documents"):
        idx.add(["plain"], embeddings=q[None, :])


def test_index_build_chunk_and_search(tmp_path, bert):
    from click.testing import CliRunner

    from e5kit.cli import main

    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": prose(30 + 40 * (i % 3), seed=i)} for i in range(12)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    r = CliRunner().invoke(main, ["index", "build", str(corpus), "--out", str(tmp_path / "ix"),
                                  "-m", str(bert.engine.checkpoint.path), "--chunk", "--chunk-overlap", "16",
                                  "--part-size", "5"])
    assert r.exit_code == 0, r.output
    assert "documents in" in r.output and "truncated" not in r.output
    idx = Index.load(tmp_path / "ix", bert)
    assert idx.chunked and len(idx.documents()) == 12
    # the chunks stored are exactly e5kit.chunk's, title repeated on each
    expected = chunk([d["text"] for d in docs], bert, overlap=16, titles=[d["title"] for d in docs])
    assert len(idx) == sum(len(cs) for cs in expected)
    np.testing.assert_allclose(idx.vector("d4#1"), bert.encode_passages(expected[4][1].text), atol=1e-5)
    r = CliRunner().invoke(main, ["search", str(tmp_path / "ix"), "gene study", "-k", "3", "--format", "jsonl"])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    hits = idx.search("gene study", k=3)
    assert [x["id"] for x in lines] == [h.id for h in hits] and len({x["id"] for x in lines}) == 3
    assert lines[0]["highlight"] == hits[0].highlight and lines[0]["span"] == list(hits[0].span)
    assert lines[0]["metadata"] == {"title": docs[int(hits[0].id[1:])]["title"]}


def test_embed_cli_long(tmp_path, bert):
    from click.testing import CliRunner

    from e5kit.cli import main

    texts = [prose(120, seed=4), "gene study"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    m = ["-m", str(bert.engine.checkpoint.path)]
    r = CliRunner().invoke(main, ["embed", "--type", "passage", "--long", "chunks", "--chunk-overlap", "16", "-i",
                                  str(src), *m])
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.output.splitlines()]
    expected = bert.encode_passages(texts, long="chunks", chunk_overlap=16)
    assert [(x["doc"], tuple(x["span"])) for x in lines] == [(c.doc, c.span) for c in expected.chunks]
    np.testing.assert_allclose([x["embedding"] for x in lines], expected.vectors, atol=1e-5)
    r = CliRunner().invoke(main, ["embed", "--type", "passage", "--long", "mean", "-i", str(src), "-o",
                                  str(tmp_path / "m.npy"), *m])
    assert r.exit_code == 0, r.output
    np.testing.assert_allclose(np.load(tmp_path / "m.npy"), bert.encode_passages(texts, long="mean"), atol=1e-5)
    r = CliRunner().invoke(main, ["embed", "--long", "chunks", "x", *m])
    assert r.exit_code != 0 and "--type passage" in r.output
