"""Every limit and bad input gets its documented status in OpenAI's error shape; keys; backpressure."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from server_helpers import ALICE_KEY, KEY, metric
from e5kit import E5

LONG = " ".join(["the cell study of gene and cancer risk in patients"] * 80)  # > 512 tokens


def post(server, path, body=None, *, content=None, headers=None, key=True):
    h = dict(server.headers if key else {})
    h.update(headers or {})
    if content is None:
        content = json.dumps(body)
        h.setdefault("content-type", "application/json")
    return httpx.post(server.url + path, content=content, headers=h, timeout=60)


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err
    return err


def oai(server, key=None):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or server.key or "x", max_retries=0)


def test_auth(tiny_server):
    url = tiny_server.url
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/ready").status_code == 200
    assert httpx.get(url + "/docs").status_code == 200
    spec = httpx.get(url + "/openapi.json").json()
    assert "input" in spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]["application/json"]["schema"][
        "properties"]
    assert_error(post(tiny_server, "/v1/embeddings", {"input": "a"}, key=False), 401, contains="missing API key")
    assert_error(post(tiny_server, "/embed", {"inputs": "a"}, headers={"Authorization": "Bearer nope"}, key=False),
                 401, contains="invalid API key")
    assert_error(post(tiny_server, "/embed", {"inputs": "a"}, headers={"Authorization": f"Basic {KEY}"}, key=False),
                 401)
    for path in ("/metrics", "/v1/models", "/v1/usage"):
        assert_error(httpx.get(url + path), 401)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        oai(tiny_server, "sk-wrong").embeddings.create(input="a", model="tiny")
    with pytest.raises(openai.AuthenticationError):
        oai(tiny_server, KEY[:-1]).embeddings.create(input="a", model="tiny")  # a prefix of a real key
    for key in (KEY, ALICE_KEY):
        assert oai(tiny_server, key).embeddings.create(input="a", model="tiny").data
    assert httpx.get(url + "/metrics", headers=tiny_server.headers).status_code == 200
    assert KEY not in tiny_server.log() and ALICE_KEY not in tiny_server.log()


def test_size_limits(tiny_server):
    # Body over --max-body-bytes (1 MB here): with Content-Length and chunked.
    big = json.dumps({"input": "a" * 1_000_100})
    assert_error(post(tiny_server, "/v1/embeddings", content=big), 413, contains="1000000")

    def chunks():
        yield b'{"input": "'
        for _ in range(200):
            yield b"a" * 10_000
        yield b'"}'

    assert_error(post(tiny_server, "/v1/embeddings", content=chunks()), 413, contains="1000000")
    # More than 2048 inputs.
    with pytest.raises(openai.APIStatusError, match="2048") as e:
        oai(tiny_server).embeddings.create(input=["a"] * 2049, model="tiny")
    assert e.value.status_code == 413 and e.value.body["param"] == "input"
    assert len(oai(tiny_server).embeddings.create(input=["a"] * 2048, model="tiny").data) == 2048
    assert_error(post(tiny_server, "/embed", {"inputs": ["a"] * 2049}), 413, param="inputs", contains="2048")
    assert_error(post(tiny_server, "/similarity", {"query": "a", "passages": ["a"] * 2048}), 413, param="passages")


def test_bad_inputs(tiny_server, tiny_bert):
    c = oai(tiny_server)
    with pytest.raises(openai.BadRequestError, match="empty string"):
        c.embeddings.create(input="", model="tiny")
    with pytest.raises(openai.BadRequestError, match="item 1 is an empty string"):
        c.embeddings.create(input=["a", ""], model="tiny")
    with pytest.raises(openai.BadRequestError, match="no tokens"):
        c.embeddings.create(input=[[2, 3], []], model="tiny")
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.embeddings.create(input=[[2, 10 ** 9]], model="tiny")
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.embeddings.create(input=[-1], model="tiny")
    with pytest.raises(openai.UnprocessableEntityError, match="1 to 2048"):
        c.embeddings.create(input=[], model="tiny")
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.embeddings.create(input="a", model="text-embedding-3-small")
    # Over-long input: cut by default (usage = the model's 512), 422 naming index and count with truncate=false.
    ok = c.embeddings.create(input=["a", LONG], model="tiny")
    assert ok.usage.total_tokens == 512 + len(E5(str(tiny_bert)).tokenize(["query: a"])[0])
    n = E5(str(tiny_bert)).engine.count_tokens(["query: " + LONG])[0]
    with pytest.raises(openai.UnprocessableEntityError, match=f"item 1 has {n} tokens.*512") as e:
        c.embeddings.create(input=["a", LONG], model="tiny", extra_body={"truncate": False})
    assert e.value.body["param"] == "input" and e.value.body["code"] == "input_too_long"
    with pytest.raises(openai.UnprocessableEntityError, match="item 0 has 600 tokens"):
        c.embeddings.create(input=[[5] * 600], model="tiny", extra_body={"truncate": False})
    assert_error(post(tiny_server, "/tokenize", {"inputs": LONG, "truncate": False}), 422, contains=f"{n} tokens")
    assert_error(post(tiny_server, "/embed", {"inputs": ["x", LONG], "truncate": False}), 422, contains="item 1")


@pytest.mark.parametrize("body,param", [
    ({"input": 123}, "input"),
    ({"input": ["a", 1]}, "input"),
    ({"input": [[1, "a"]]}, "input"),
    ({"input": [True]}, "input"),
    ({"input": None}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({}, "input"),
    ({"input": "a", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "a", "dimensions": "8"}, "dimensions"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": 2.5}, "dimensions"),
    ({"input": "a", "input_type": "document"}, "input_type"),
    ({"input": "a", "model": 5}, "model"),
    ({"input": "a", "truncate": "no"}, "truncate"),
    ({"input": "a", "user": ["x"]}, "user"),
])
def test_wrong_types_are_422(tiny_server, body, param):
    assert_error(post(tiny_server, "/v1/embeddings", body), 422, param=param)


def test_malformed_bodies(tiny_server):
    assert_error(post(tiny_server, "/v1/embeddings", content=b'{"input": "a"'), 422, contains="not valid JSON")
    assert_error(post(tiny_server, "/v1/embeddings", content=b""), 422, contains="empty")
    assert_error(post(tiny_server, "/v1/embeddings", content=b'["a"]'), 422, contains="JSON object")
    assert_error(post(tiny_server, "/v1/embeddings", content=b'{"input": "caf\xe9"}'), 400, contains="UTF-8")
    assert_error(post(tiny_server, "/v1/embeddings", content=b'{"input": "\\ud800"}'), 400, contains="surrogate")
    assert_error(post(tiny_server, "/v1/embeddings", content=b"[" * 100_000), 422)
    assert_error(post(tiny_server, "/nowhere", {"input": "a"}), 404)
    assert_error(httpx.get(tiny_server.url + "/v1/embeddings", headers=tiny_server.headers), 405)
    assert_error(post(tiny_server, "/embed", {"inputs": "a", "precision": "int8", "normalize": False}), 422,
                 param="precision")
    assert_error(post(tiny_server, "/similarity", {"query": "", "passages": ["a"]}), 400, param="query")
    assert_error(post(tiny_server, "/similarity", {"query": "a"}), 422, param="passages")


def test_nothing_a_client_sends_is_a_500(tiny_server):
    bodies = [b"null", b"0", b'"x"', b"{}", b'{"input": NaN}', b'{"input": ["\\u0000"]}', b'{"input": [[0]]}',
              b'{"input": "' + "🙂".encode() * 2000 + b'"}', b'{"input": [[1e400]]}', b'{"input": [' + b"1," * 5000 + b"1]}",
              b'{"input": ["a"], "dimensions": 99999999999999999999}', b'{"input": "\\t\\n "}', b"\xef\xbb\xbf{}",
              json.dumps({"input": ["x" * 50_000]}).encode()]
    for path in ("/v1/embeddings", "/embed", "/tokenize", "/similarity"):
        for b in bodies:
            r = post(tiny_server, path, content=b)
            assert r.status_code < 500, (path, b[:60], r.text)
            if r.status_code >= 400:
                assert_error(r, r.status_code)
    assert httpx.get(tiny_server.url + "/ready").status_code == 200  # the workers are alive
    assert oai(tiny_server).embeddings.create(input="still fine", model="tiny").data


def test_backpressure_and_disconnect(ml_server):
    """A running 3k-token job: a 3k more is refused (429), a queued client that leaves is dropped."""
    url = ml_server.url
    big = [f"{i} {LONG}" for i in range(6)]  # 6 x 512 tokens

    async def scenario():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            before = (await c.get("/metrics")).text
            a = asyncio.create_task(c.post("/v1/embeddings", json={"input": big, "model": "ml"}))
            await asyncio.sleep(0.2)  # A is in the model now (for ~1 s: the server runs one thread)
            over = await c.post("/v1/embeddings", json={"input": big, "model": "ml"})
            try:  # B waits behind A, then its client gives up
                await c.post("/v1/embeddings", json={"input": big[:5], "model": "ml"}, timeout=0.2)
                raise AssertionError("B should have timed out")
            except httpx.TimeoutException:
                pass
            ra = await a
            await asyncio.sleep(0.3)
            after = (await c.get("/metrics")).text
            return before, over, ra, after

    before, over, ra, after = asyncio.run(scenario())
    assert ra.status_code == 200 and ra.json()["usage"]["total_tokens"] == 6 * 512
    err = assert_error(over, 429, contains="busy")
    assert err["type"] == "rate_limit_error" and int(over.headers["retry-after"]) >= 1
    assert metric(after, "e5kit_dropped_inputs_total", model="ml") - metric(before, "e5kit_dropped_inputs_total",
                                                                            model="ml") == 5
    assert metric(after, "e5kit_model_tokens_total", model="ml") - metric(before, "e5kit_model_tokens_total",
                                                                          model="ml") == 6 * 512
    assert metric(after, "e5kit_queue_tokens", model="ml") == 0
    assert metric(after, "e5kit_requests_total", route="/v1/embeddings", status="429") >= 1
    # The openai client raises RateLimitError on the same condition; one request over the whole queue is 413.
    with pytest.raises(openai.APIStatusError, match="more than this server queues") as e:
        oai(ml_server).embeddings.create(input=big * 2, model="ml")
    assert e.value.status_code == 413
    assert httpx.get(url + "/ready").status_code == 200


def test_rate_limit_error_class(ml_server):
    big = [f"{i} {LONG}" for i in range(6)]

    async def scenario():
        async with httpx.AsyncClient(base_url=ml_server.url, timeout=120) as c:
            a = asyncio.create_task(c.post("/v1/embeddings", json={"input": big, "model": "ml"}))
            await asyncio.sleep(0.3)
            client = openai.AsyncOpenAI(base_url=ml_server.url + "/v1", api_key="x", max_retries=0)
            try:
                await client.embeddings.create(input=big, model="ml")
            except openai.RateLimitError as e:
                err = e
            else:
                err = None
            await a
            return err

    err = asyncio.run(scenario())
    assert isinstance(err, openai.RateLimitError) and err.response.headers["retry-after"]
