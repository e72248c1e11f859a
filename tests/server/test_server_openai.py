"""The OpenAI route with the real `openai` client, against e5kit's library output (in-process app;
the last test runs the real model behind a real `e5kit serve` process)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from server_helpers import ALICE_KEY, KEY, metric
from e5kit import E5

TEXTS = ["how much protein should a female eat", "summit define", "query: already prefixed",
         "the cell study of gene and cancer risk in patients", "a"]


def client(server, key: str | None = None) -> openai.OpenAI:
    if hasattr(server, "openai"):  # in-process
        return server.openai(key)
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or server.key or "unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_lib(tiny_bert):
    return E5(str(tiny_bert))


def vectors(resp) -> np.ndarray:
    """Rows in index order; an explicit encoding_format="base64" leaves decoding to the caller."""
    rows = [d.embedding for d in sorted(resp.data, key=lambda d: d.index)]
    if rows and isinstance(rows[0], str):
        rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
    return np.array(rows, dtype=np.float32)


@pytest.mark.parametrize("fmt", ["float", "base64", None])
def test_openai_client_matches_library(tiny_server, tiny_lib, fmt):
    kw = {} if fmt is None else {"encoding_format": fmt}  # None: the client asks for base64 and decodes it
    resp = client(tiny_server).embeddings.create(input=TEXTS, model="tiny", **kw)
    assert resp.object == "list" and resp.model == "tiny" and len(resp.data) == len(TEXTS)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    # The server's default input_type is "query": the same as encode_queries (no double prefix).
    np.testing.assert_allclose(vectors(resp), tiny_lib.encode_queries(TEXTS), atol=1e-5)
    n = sum(len(ids) for ids in tiny_lib.tokenize(tiny_lib.format(TEXTS, "query")))
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == n


def test_single_string_input_types_and_token_ids(tiny_server, tiny_lib):
    c = client(tiny_server)
    one = c.embeddings.create(input="protein for women", model="tiny", encoding_format="float")
    np.testing.assert_allclose(vectors(one)[0], tiny_lib.encode_queries("protein for women"), atol=1e-5)
    p = c.embeddings.create(input=TEXTS, model="tiny", extra_body={"input_type": "passage"})
    np.testing.assert_allclose(vectors(p), tiny_lib.encode_passages(TEXTS), atol=1e-5)
    raw = c.embeddings.create(input=TEXTS, model="tiny", extra_body={"input_type": "raw"})
    np.testing.assert_allclose(vectors(raw), tiny_lib.encode(TEXTS), atol=1e-5)
    # Token ids are embedded as given: one list of ints is one input, a list of lists is many.
    ids = tiny_lib.tokenize(tiny_lib.format(TEXTS, "passage"))
    by_ids = c.embeddings.create(input=ids, model="tiny")
    np.testing.assert_allclose(vectors(by_ids), vectors(p), atol=1e-5)
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))
    single_ids = c.embeddings.create(input=ids[0], model="tiny")
    np.testing.assert_allclose(vectors(single_ids)[0], vectors(p)[0], atol=1e-5)


def test_dimensions_truncate_and_renormalise(tiny_server, tiny_lib):
    c = client(tiny_server)
    full = tiny_lib.encode_queries(TEXTS)
    for fmt in ("float", "base64"):
        resp = c.embeddings.create(input=TEXTS, model="tiny", dimensions=8, encoding_format=fmt)
        got = vectors(resp)
        want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
        assert got.shape == (len(TEXTS), 8)
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(input="a", model="tiny", dimensions=tiny_lib.dim + 1)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        c.embeddings.create(input="a", model="tiny", dimensions=0)


def test_models_and_aliases(tiny_server, tiny_xlmr, tiny_lib):
    c = client(tiny_server)
    ids = [m.id for m in c.models.list().data]
    assert ids == ["tiny", "xlmr", "inst"]
    card = c.models.retrieve("tiny")
    assert card.id == "tiny" and card.model_extra["dimensions"] == tiny_lib.dim
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.models.retrieve("intfloat/e5-large-v2")
    # The XLM-R model is reachable by its id and by its directory name.
    a = c.embeddings.create(input=TEXTS, model="xlmr")
    b = c.embeddings.create(input=TEXTS, model=tiny_xlmr.name)
    np.testing.assert_allclose(vectors(a), E5(str(tiny_xlmr)).encode_queries(TEXTS), atol=1e-5)
    np.testing.assert_allclose(vectors(a), vectors(b), atol=0)


def test_tokenize_shows_prefixes_and_task(tiny_server):
    def tok(model, inputs, **kw):
        r = tiny_server.client.post("/tokenize", json={"model": model, "inputs": inputs, **kw},
                                    headers=tiny_server.headers)
        assert r.status_code == 200, r.text
        return r.json()["data"]

    assert [d["text"] for d in tok("tiny", ["protein", "query: protein"])] == ["query: protein", "query: protein"]
    assert tok("tiny", "protein", input_type="passage")[0]["text"] == "passage: protein"
    assert tok("tiny", "passage: protein", input_type="passage")[0]["text"] == "passage: protein"
    assert tok("tiny", "protein", input_type="raw")[0]["text"] == "protein"
    assert tok("tiny", "protein", task="SciFact")[0]["text"] == "query: protein"  # e5 style ignores task
    inst = tok("inst", "protein", task="SciFact")[0]
    assert inst["text"] == ("Instruct: Given a scientific claim, retrieve documents that support or refute the claim"
                            "\nQuery: protein")
    assert tok("inst", "protein", task="Find the answer")[0]["text"] == "Instruct: Find the answer\nQuery: protein"
    assert tok("inst", "protein", input_type="passage")[0]["text"] == "protein"
    # Offsets point into the formatted text; special tokens are marked.
    d = tok("tiny", "protein women")[0]
    words = [d["text"][t["start"]:t["stop"]] for t in d["tokens"] if not t["special"]]
    assert words == ["query", ":", "protein", "women"]
    assert d["tokens"][0]["special"] and d["tokens"][-1]["special"]


def test_task_changes_instruct_embedding(tiny_server, tiny_instruct):
    lib = E5(str(tiny_instruct))
    c = client(tiny_server)
    a = c.embeddings.create(input=TEXTS, model="inst", extra_body={"task": "SciFact"})
    np.testing.assert_allclose(vectors(a), lib.encode_queries(TEXTS, task="SciFact"), atol=1e-5)
    b = c.embeddings.create(input=TEXTS, model="inst")
    np.testing.assert_allclose(vectors(b), lib.encode_queries(TEXTS), atol=1e-5)
    assert not np.allclose(vectors(a), vectors(b), atol=1e-3)


def test_native_embed_and_similarity(tiny_server, tiny_lib):
    h = tiny_server.headers
    post = tiny_server.client.post
    r = post("/embed", json={"inputs": TEXTS, "input_type": "passage"}, headers=h)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json(), np.float32), tiny_lib.encode_passages(TEXTS), atol=1e-5)
    raw = post("/embed", json={"inputs": TEXTS, "normalize": False}, headers=h).json()
    np.testing.assert_allclose(np.array(raw, np.float32),
                               tiny_lib.encode_queries(TEXTS, normalize_embeddings=False), atol=1e-4)
    b = post("/embed", json={"inputs": TEXTS, "precision": "ubinary"}, headers=h).json()
    np.testing.assert_array_equal(np.array(b, np.uint8), np.packbits(tiny_lib.encode_queries(TEXTS) > 0, axis=-1))
    s = post("/similarity", json={"query": "protein", "passages": TEXTS}, headers=h).json()
    want = tiny_lib.similarity(tiny_lib.encode_queries("protein"), tiny_lib.encode_passages(TEXTS))[0]
    np.testing.assert_allclose(s["scores"], want, atol=1e-3)
    assert [x["index"] for x in s["ranking"]] == list(np.argsort(-want, kind="stable"))


def test_usage_metering_per_key(tiny_server, tiny_lib):
    def usage(key):
        r = tiny_server.client.get("/v1/usage", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        return r.json()

    before = usage(ALICE_KEY)
    assert before["key"] == "alice"
    resp = client(tiny_server, ALICE_KEY).embeddings.create(input=TEXTS, model="tiny")
    after = usage(ALICE_KEY)
    assert after["requests"] == before["requests"] + 1
    assert after["total_tokens"] == before["total_tokens"] + resp.usage.total_tokens
    assert after["cost_usd"] == pytest.approx(after["total_tokens"] * 0.01 / 1e6)
    assert after["models"]["tiny"]["tokens"] >= resp.usage.total_tokens
    text = tiny_server.client.get("/metrics", headers=tiny_server.headers).text
    assert metric(text, "e5kit_tokens_total", key="alice", model="tiny") == after["models"]["tiny"]["tokens"]
    assert metric(text, "e5kit_requests_total", key="alice", route="/v1/embeddings", status="200") >= 1
    assert KEY not in text and ALICE_KEY not in text


def test_real_model_openai_parity(ml_server, ml_e5):
    lib = E5(str(ml_e5))
    texts = ["how much protein should a female eat", "南瓜的家常做法", "Wie viel Protein braucht eine Frau?",
             "passage: As a general guideline, the CDC's average requirement of protein for women is 46 grams."]
    c = client(ml_server)
    for fmt in ("float", "base64"):
        resp = c.embeddings.create(input=texts, model="ml", encoding_format=fmt)
        np.testing.assert_allclose(vectors(resp), lib.encode_queries(texts), atol=1e-5)
    p = c.embeddings.create(input=texts, model="ml", extra_body={"input_type": "passage"})
    np.testing.assert_allclose(vectors(p), lib.encode_passages(texts), atol=1e-5)
    assert p.usage.total_tokens == sum(len(x) for x in lib.tokenize(lib.format(texts, "passage")))
    # The real model ranks the right passage first for the model-card example.
    s = httpx.post(ml_server.url + "/similarity", json={"query": "how much protein should a female eat", "passages": [
        "As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 is 46 grams per day.",
        "Definition of summit for English Language Learners: the highest point of a mountain."]}).json()
    assert s["ranking"][0]["index"] == 0
    u = httpx.get(ml_server.url + "/v1/usage").json()
    assert u["key"] == "anonymous" and u["total_tokens"] > 0


def test_tokenize_reports_what_the_model_sees(tiny_server, tiny_lib):
    """Literal special-token strings in user text are text: /tokenize and /v1/embeddings agree."""
    text = "protein [SEP] for [PAD] women [CLS]"
    r = tiny_server.client.post("/tokenize", json={"model": "tiny", "inputs": text}, headers=tiny_server.headers)
    d = r.json()["data"][0]
    ids = [t["id"] for t in d["tokens"]]
    assert ids == tiny_lib.tokenize(tiny_lib.format([text], "query"))[0]
    assert [t["special"] for t in d["tokens"]] == [True] + [False] * (len(ids) - 2) + [True]
    special_ids = {tiny_lib.engine.tokenizer.token_to_id(s) for s in ("[SEP]", "[PAD]", "[CLS]")}
    assert not special_ids & set(ids[1:-1])
    resp = client(tiny_server).embeddings.create(input=text, model="tiny")
    assert resp.usage.total_tokens == len(ids)
    by_ids = client(tiny_server).embeddings.create(input=ids, model="tiny")
    np.testing.assert_allclose(vectors(resp), vectors(by_ids), atol=1e-6)


def test_default_model_id_is_a_name_not_a_path(tiny_bert):
    """`-m /abs/path/dir` is served as "dir": no filesystem path in responses or errors."""
    from e5kit.server import create_app
    from e5kit.server.service import served_name
    from inprocess import InProcessServer

    name = served_name(str(tiny_bert))
    assert name == tiny_bert.name and "/" not in name
    server = InProcessServer(create_app([(name, E5(str(tiny_bert)))]))
    try:
        c = server.client
        texts = [c.get("/ready").text, c.get("/v1/models").text,
                 c.post("/v1/embeddings", json={"input": "a"}).text,
                 c.post("/v1/embeddings", json={"input": "a", "model": "nope"}).text]
        for t in texts:
            assert str(tiny_bert.parent) not in t, t
        assert client(server).embeddings.create(input="a", model=name).model == name
    finally:
        server.stop()


def test_openapi_document(tiny_server, tiny_bert):
    """/openapi.json (what clients are generated from and fuzzing checks against) is precise: Bearer
    security exactly when keys are on, /metrics as text/plain, every error in OpenAI's shape, request
    schemas that exclude empty strings and empty lists."""
    from e5kit.server import create_app
    from inprocess import InProcessServer

    doc = tiny_server.client.get("/openapi.json").json()
    ops = {(path, method): op for path, item in doc["paths"].items() for method, op in item.items()}
    assert list(doc["components"]["securitySchemes"]) == ["HTTPBearer"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for key, op in ops.items():
        assert (op.get("security") == [{"HTTPBearer": []}]) == (key not in {("/health", "get"), ("/ready", "get")}), key
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type", "param", "code"}
    metrics = ops["/metrics", "get"]["responses"]
    assert list(metrics["200"]["content"]) == ["text/plain"] and metrics["401"]["content"] == error
    assert tiny_server.client.get("/metrics", headers=tiny_server.headers).headers["content-type"].startswith("text/plain")
    for path in ("/v1/embeddings", "/embed", "/similarity", "/tokenize"):
        responses = ops[path, "post"]["responses"]
        assert {"400", "401", "404", "408", "413", "429", "503"} <= set(responses), path
        assert path.startswith("/v1") or {"415", "422"} <= set(responses), path
        for status, resp in responses.items():
            assert status == "200" or resp["content"] == error, (path, status)
        for status in ("429", "503"):
            assert responses[status]["headers"]["Retry-After"]["schema"] == {"type": "integer"}

    def body(path: str) -> dict:
        return ops[path, "post"]["requestBody"]["content"]["application/json"]["schema"]

    text, texts, ids, id_lists = body("/v1/embeddings")["properties"]["input"]["anyOf"]
    assert text == {"type": "string", "minLength": 1} and "input" in body("/v1/embeddings")["required"]
    assert texts["minItems"] == 1 and texts["maxItems"] == 2048 and texts["items"] == text
    assert ids["minItems"] == 1 and ids["items"]["type"] == "integer" and ids["items"]["minimum"] == 0
    assert id_lists["minItems"] == 1 and id_lists["maxItems"] == 2048 and id_lists["items"] == ids
    assert body("/embed")["properties"]["inputs"]["anyOf"] == [text, texts, ids, id_lists]
    assert body("/tokenize")["properties"]["inputs"]["anyOf"] == [text, texts]
    sim = body("/similarity")["properties"]
    assert sim["query"]["minLength"] == 1 and sim["passages"]["minItems"] == 1 and sim["passages"]["items"] == text
    for path in ("/v1/embeddings", "/embed", "/similarity", "/tokenize"):
        assert body(path)["properties"]["task"]["anyOf"][0]["minLength"] == 1, path
    # Keys off: no security declared anywhere.
    server = InProcessServer(create_app([("t", E5(str(tiny_bert)))]))
    try:
        doc = server.client.get("/openapi.json").json()
    finally:
        server.stop()
    assert "securitySchemes" not in doc.get("components", {})
    assert not any("security" in op for item in doc["paths"].values() for op in item.values())
