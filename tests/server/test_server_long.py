"""/embed long=mean|chunks (in-process app): equal to the library's encode_passages(long=...), chunked
on the server, admitted and queued by the chunks' true token count, metered by it; clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from e5kit import E5
from e5kit.server import ServerConfig, create_app
from inprocess import InProcessServer

WORDS = "the cell study gene cancer risk patients protein women day marathon mountain leaders government".split()


def prose(n_sentences: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(" ".join(rng.choice(WORDS, int(rng.integers(5, 25)))).capitalize() + "." for _ in range(n_sentences))


TEXTS = [prose(150, 1), "protein women day", prose(60, 2)]  # ~1900 tokens, 3, ~750


@pytest.fixture(scope="module")
def lib(tiny_bert):
    return E5(str(tiny_bert))


def embed(server, **body):
    return server.client.post("/embed", json={"model": "tiny", **body}, headers=server.headers)


def usage_tokens(server) -> int:
    return server.client.get("/v1/usage", headers=server.headers).json()["total_tokens"]


def test_long_mean_and_chunks_equal_the_library(tiny_server, lib):
    before = usage_tokens(tiny_server)
    r = embed(tiny_server, inputs=TEXTS, long="mean", chunk_overlap=32)
    assert r.status_code == 200, r.text
    mean = lib.encode_passages(TEXTS, long="mean", chunk_overlap=32)
    np.testing.assert_allclose(np.array(r.json(), np.float32), mean, atol=1e-5)
    chunks = lib.encode_passages(TEXTS, long="chunks", chunk_overlap=32)
    n_tokens = sum(c.n_tokens for c in chunks.chunks)  # every chunk, prefix and special tokens included
    assert int(r.headers["x-e5kit-tokens"]) == n_tokens and r.headers["x-e5kit-chunks"] == str(len(chunks))
    assert usage_tokens(tiny_server) == before + n_tokens  # metered by the true token count

    r = embed(tiny_server, inputs=TEXTS, long="chunks", chunk_overlap=32)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [len(x) for x in body] == [int((chunks.doc == d).sum()) for d in range(3)] and len(body[0]) >= 4
    flat = [c for per_input in body for c in per_input]
    assert [tuple(c["span"]) for c in flat] == [c.span for c in chunks.chunks]
    np.testing.assert_allclose(np.array([c["embedding"] for c in flat], np.float32), chunks.vectors, atol=1e-5)
    assert body[0][-1]["span"][1] == len(TEXTS[0])  # spans reach the end of the text: nothing cut

    # dimensions and precision apply to the mean vector; truncate (the default) is today's behaviour
    r = embed(tiny_server, inputs=TEXTS[0], long="mean", dimensions=8)
    cut = lib.encode_passages(TEXTS[0], long="mean")[:8]
    np.testing.assert_allclose(r.json()[0], cut / np.linalg.norm(cut), atol=1e-5)
    r = embed(tiny_server, inputs=TEXTS)
    assert r.headers["x-e5kit-truncated"] == "2" and "x-e5kit-chunks" not in r.headers
    with pytest.warns(UserWarning, match="truncated"):
        np.testing.assert_allclose(np.array(r.json(), np.float32), lib.encode_queries(TEXTS), atol=1e-5)


def test_long_errors(tiny_server, lib):
    ids = lib.prepare(["protein"], "passage").ids[0]
    for body, param in [({"inputs": [ids], "long": "mean"}, "inputs"),
                        ({"inputs": "protein", "long": "chunks", "input_type": "query"}, "input_type"),
                        ({"inputs": "protein", "long": "split"}, "long"),
                        ({"inputs": "protein", "long": "mean", "chunk_overlap": -1}, "chunk_overlap")]:
        r = embed(tiny_server, **body)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    r = embed(tiny_server, inputs="protein", long="mean", dimensions=4096)
    assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"


def test_long_is_admitted_by_its_chunks_tokens(tiny_bert):
    """A text the truncating path embeds in 512 tokens is ~1900 tokens as chunks: over this server's queue cap."""
    app = create_app([("tiny", E5(str(tiny_bert)))], ServerConfig(max_queued_tokens=1500))
    server = InProcessServer(app)
    try:
        assert embed(server, inputs=TEXTS[0]).status_code == 200
        r = embed(server, inputs=TEXTS[0], long="mean")
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_tokens", r.text
        assert embed(server, inputs=TEXTS[2], long="mean").status_code == 200
    finally:
        server.stop()
