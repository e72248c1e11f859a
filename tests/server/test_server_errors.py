"""Every limit and bad input gets its documented status in OpenAI's error shape (in-process app)."""

from __future__ import annotations

import json

import openai
import pytest

from server_helpers import ALICE_KEY, KEY
from e5kit import E5

LONG = " ".join(["the cell study of gene and cancer risk in patients"] * 80)  # > 512 tokens


def post(server, path, body=None, *, content=None, headers=None, key=True):
    h = dict(server.headers if key else {})
    h.update(headers or {})
    if content is None:
        content = json.dumps(body)
        h.setdefault("content-type", "application/json")
    return server.client.post(path, content=content, headers=h)


def assert_error(r, status: int, *, param: str | None = None, contains: str = "", code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    assert contains.lower() in err["message"].lower(), err
    return err


def test_auth(tiny_server):
    c = tiny_server.client
    assert c.get("/health").status_code == 200
    assert c.get("/ready").status_code == 200
    assert c.get("/docs").status_code == 200
    assert_error(post(tiny_server, "/v1/embeddings", {"input": "a"}, key=False), 401, contains="missing API key")
    assert_error(post(tiny_server, "/embed", {"inputs": "a"}, headers={"Authorization": "Bearer nope"}, key=False),
                 401, contains="invalid API key")
    assert_error(post(tiny_server, "/embed", {"inputs": "a"}, headers={"Authorization": f"Basic {KEY}"}, key=False),
                 401)
    # A key in the query string is not a credential.
    assert_error(c.post(f"/v1/embeddings?api_key={KEY}", json={"input": "a"}), 401)
    for path in ("/metrics", "/v1/models", "/v1/usage"):
        assert_error(c.get(path), 401)
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        tiny_server.openai("sk-wrong").embeddings.create(input="a", model="tiny")
    with pytest.raises(openai.AuthenticationError):
        tiny_server.openai(KEY[:-1]).embeddings.create(input="a", model="tiny")  # a prefix of a real key
    for key in (KEY, ALICE_KEY):
        assert tiny_server.openai(key).embeddings.create(input="a", model="tiny").data
    assert c.get("/metrics", headers=tiny_server.headers).status_code == 200


def test_size_limits(tiny_server):
    # Body over max_body_bytes (1 MB here): with Content-Length and chunked. 413 on every route.
    big = json.dumps({"input": "a" * 1_000_100})
    assert_error(post(tiny_server, "/v1/embeddings", content=big), 413, contains="1000000", code="request_too_large")

    def chunks():
        yield b'{"input": "'
        for _ in range(200):
            yield b"a" * 10_000
        yield b'"}'

    assert_error(post(tiny_server, "/v1/embeddings", content=chunks()), 413, contains="1000000")
    # More than 2048 inputs: OpenAI answers 400 on /v1, the native routes 413.
    with pytest.raises(openai.BadRequestError, match="2048") as e:
        tiny_server.openai().embeddings.create(input=["a"] * 2049, model="tiny")
    assert e.value.status_code == 400 and e.value.body["param"] == "input"
    assert len(tiny_server.openai().embeddings.create(input=["a"] * 2048, model="tiny").data) == 2048
    assert_error(post(tiny_server, "/embed", {"inputs": ["a"] * 2049}), 413, param="inputs", contains="2048")
    assert_error(post(tiny_server, "/similarity", {"query": "a", "passages": ["a"] * 2048}), 413, param="passages")


def test_bad_inputs(tiny_server, tiny_bert):
    c = tiny_server.openai()
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
    with pytest.raises(openai.BadRequestError, match="1 to 2048"):
        c.embeddings.create(input=[], model="tiny")
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.embeddings.create(input="a", model="text-embedding-3-small")
    # Over-long input: cut by default (usage = the model's 512), an error naming index and count with
    # truncate=false: 400 on /v1 (as OpenAI's context-length error), 422 on the native routes.
    ok = c.embeddings.create(input=["a", LONG], model="tiny")
    assert ok.usage.total_tokens == 512 + len(E5(str(tiny_bert)).tokenize(["query: a"])[0])
    n = E5(str(tiny_bert)).engine.count_tokens(["query: " + LONG])[0]
    with pytest.raises(openai.BadRequestError, match=f"item 1 has {n} tokens.*512") as e:
        c.embeddings.create(input=["a", LONG], model="tiny", extra_body={"truncate": False})
    assert e.value.body["param"] == "input" and e.value.body["code"] == "input_too_long"
    with pytest.raises(openai.BadRequestError, match="item 0 has 600 tokens"):
        c.embeddings.create(input=[[5] * 600], model="tiny", extra_body={"truncate": False})
    assert_error(post(tiny_server, "/tokenize", {"inputs": LONG, "truncate": False}), 422, contains=f"{n} tokens")
    assert_error(post(tiny_server, "/embed", {"inputs": ["x", LONG], "truncate": False}), 422, contains="item 1")


WRONG = [
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
    ({"input": "a", "dimensions": -3}, "dimensions"),
    ({"input": "a", "dimensions": 2.5}, "dimensions"),
    ({"input": "a", "dimensions": 385}, "dimensions"),
    ({"input": "a", "input_type": "document"}, "input_type"),
    ({"input": "a", "model": 5}, "model"),
    ({"input": "a", "truncate": "no"}, "truncate"),
    ({"input": "a", "user": ["x"]}, "user"),
    ({"input": "a", "task": ""}, "task"),
]


@pytest.mark.parametrize("body,param", WRONG)
def test_wrong_fields_are_400_on_v1(tiny_server, body, param):
    # OpenAI answers 400 invalid_request_error; `except openai.BadRequestError` must catch e5kit's too.
    assert_error(post(tiny_server, "/v1/embeddings", body), 400, param=param)


@pytest.mark.parametrize("field,value", [("dimensions", 0), ("dimensions", "8"), ("input_type", "doc"),
                                         ("truncate", "no"), ("normalize", 1), ("precision", "fp8")])
def test_wrong_fields_are_422_native(tiny_server, field, value):
    assert_error(post(tiny_server, "/embed", {"inputs": "a", field: value}), 422, param=field)


def test_openai_client_raises_bad_request(tiny_server):
    c = tiny_server.openai()
    for kw in ({"dimensions": 0}, {"dimensions": 10 ** 30}, {"extra_body": {"input_type": "doc"}}):
        with pytest.raises(openai.BadRequestError):
            c.embeddings.create(input="a", model="tiny", **kw)


def test_malformed_bodies(tiny_server):
    v1, native = "/v1/embeddings", "/embed"
    for path, status in ((v1, 400), (native, 422)):
        assert_error(post(tiny_server, path, content=b'{"input": "a"'), status, contains="not valid JSON")
        assert_error(post(tiny_server, path, content=b""), status, contains="empty")
        assert_error(post(tiny_server, path, content=b'["a"]'), status, contains="JSON object")
        assert_error(post(tiny_server, path, content=b"[" * 100_000), status)
        # A raw (unescaped) NUL byte: a control character JSON does not allow in a string, or a stray byte.
        assert_error(post(tiny_server, path, content=b'{"input": "a\x00b"}'), status, contains="not valid JSON")
        assert_error(post(tiny_server, path, content=b'{"input": "a"}\x00'), status, contains="not valid JSON")
        assert_error(post(tiny_server, path, content=b'\x00{"input": "a"}'), status, contains="not valid JSON")
    assert_error(post(tiny_server, v1, content=b'{"input": "caf\xe9"}'), 400, contains="UTF-8")
    assert_error(post(tiny_server, v1, content=b'{"input": "\\ud800"}'), 400, contains="surrogate")
    # Content type: JSON only (none given is read as JSON).
    r = post(tiny_server, v1, content=b'{"input": "a"}', headers={"content-type": "text/plain"})
    assert_error(r, 400, contains="application/json")
    r = post(tiny_server, native, content=b'{"inputs": "a"}', headers={"content-type": "text/plain"})
    assert_error(r, 415, contains="application/json")
    assert post(tiny_server, v1, content=b'{"input": "a"}', headers={"content-type": "application/json; "
                                                                                     "charset=utf-8"}).status_code == 200
    assert_error(post(tiny_server, "/nowhere", {"input": "a"}), 404)
    assert_error(tiny_server.client.get(v1, headers=tiny_server.headers), 405)
    assert_error(post(tiny_server, "/embed", {"inputs": "a", "precision": "int8", "normalize": False}), 422,
                 param="precision")
    assert_error(post(tiny_server, "/similarity", {"query": "", "passages": ["a"]}), 400, param="query")
    assert_error(post(tiny_server, "/similarity", {"query": "a"}), 422, param="passages")


def test_huge_integer_is_400(tiny_server):
    digits = "9" * 5000
    for path, field in (("/v1/embeddings", "input"), ("/embed", "inputs")):
        r = post(tiny_server, path, content=f'{{"{field}": "hi", "dimensions": {digits}}}'.encode())
        assert_error(r, 400 if path.startswith("/v1") else 422)
        r = post(tiny_server, path, content=f'{{"{field}": [[{digits}]]}}'.encode())
        assert_error(r, 400 if path.startswith("/v1") else 422)
        r = post(tiny_server, path, content=f'{{"{field}": "hi", "dimensions": {"9" * 4000}}}'.encode())
        assert_error(r, 400 if path.startswith("/v1") else 422, param="dimensions")


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embed", "/similarity", "/tokenize"])
def test_task_with_lone_surrogate_is_400(tiny_server, path):
    body = {"/v1/embeddings": b'{"input": "a", "model": "inst", "task": "\\ud800"}',
            "/embed": b'{"inputs": "a", "model": "inst", "task": "\\ud800"}',
            "/similarity": b'{"query": "a", "passages": ["b"], "model": "inst", "task": "x\\udfff"}',
            "/tokenize": b'{"inputs": "a", "model": "inst", "task": "\\ud800"}'}[path]
    assert_error(post(tiny_server, path, content=body), 400, param="task", contains="surrogate")
    r = post(tiny_server, path, content=body.replace(b'"model"', b'"user": "\\ud83d", "model"'))
    assert r.status_code == 400


def test_nothing_a_client_sends_is_a_500(tiny_server):
    bodies = [b"null", b"0", b'"x"', b"{}", b'{"input": NaN}', b'{"input": ["\\u0000"]}', b'{"input": [[0]]}',
              b'{"input": "' + "🙂".encode() * 2000 + b'"}', b'{"input": [[1e400]]}', b'{"input": [' + b"1," * 5000 + b"1]}",
              b'{"input": ["a"], "dimensions": 99999999999999999999}', b'{"input": "\\t\\n "}', b"\xef\xbb\xbf{}",
              b'{"input": "a", "model": "\\ud800"}', b'{"\\ud800": 1, "input": "a"}', b'{"input": [["a"]]}',
              b'{"input": [[]]}', b'{"input": [[-1]]}', b'{"input": ' + b"[" * 50 + b"]" * 50 + b"}",
              b'{"inputs": "a", "query": "a", "passages": [""]}', b'{"input": "a\\u0000b", "inputs": "\\u0000"}',
              b'{"input": ["a\x00"], "inputs": "\x00", "query": "\x00"}', b'{"input": "a", "model": "\x00"}\x00',
              json.dumps({"input": ["x" * 50_000]}).encode()]
    for path in ("/v1/embeddings", "/embed", "/tokenize", "/similarity"):
        for b in bodies:
            r = post(tiny_server, path, content=b)
            assert r.status_code < 500, (path, b[:60], r.text)
            if r.status_code >= 400:
                assert_error(r, r.status_code)
    assert tiny_server.client.get("/ready").status_code == 200  # the workers are alive
    assert tiny_server.openai().embeddings.create(input="still fine", model="tiny").data
