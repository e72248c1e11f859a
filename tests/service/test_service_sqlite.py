"""The service on a SQLite file, through a real `e5kit serve --database-url` process: the ledger,
keys, limits, login, CSRF and the refusals of the security checklist."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import threading
import time
import uuid
from urllib.parse import unquote

import httpx
import pytest

from conftest import PASSWORD, Accounts
from e5kit import E5
from e5kit.server import ServerConfig
from e5kit.service.accounts import list_keys
from e5kit.service.app import ServiceConfig, create_service_app
from e5kit.service.db import WebSession
from inprocess import InProcessServer

SQLI = ["' OR '1'='1", "x'; DROP TABLE usage; --", '" OR 1=1 --', "1 UNION SELECT secret_hash FROM api_keys"]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def login(url: str, email: str, password: str = PASSWORD) -> tuple[httpx.Client, httpx.Response]:
    c = httpx.Client(base_url=url, timeout=30)
    form = c.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    r = c.post("/login", data={"email": email, "password": password, "csrf": csrf, "next": "/account"})
    return c, r


def page_csrf(c: httpx.Client, path: str = "/") -> str:
    return re.search(r'data-csrf="([^"]*)"', c.get(path).text).group(1)


def test_ledger_equals_usage_received(sqlite_service):
    server, acc = sqlite_service
    acc.user("ledger@example.com")
    key, kid = acc.key("ledger@example.com", "ci")
    got = 0
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as c:
        for i in range(6):
            r = c.post("/v1/embeddings", json={"input": [f"text number {i}", "another one " * (i + 1)]})
            assert r.status_code == 200, r.text
            got += r.json()["usage"]["prompt_tokens"]
        r = c.post("/embed", json={"inputs": ["native route"], "input_type": "passage"})
        assert r.status_code == 200
        got += int(r.headers["x-e5kit-tokens"])
        r = c.post("/similarity", json={"query": "q", "passages": ["a b", "c d e"]})
        got += r.json()["usage"]["prompt_tokens"]
        # failures are never billed
        assert c.post("/v1/embeddings", json={"input": []}).status_code == 400  # OpenAI status codes on /v1
        assert c.post("/v1/embeddings", json={"input": "x", "model": "nope"}).status_code == 404
        assert c.post("/embed", json={"inputs": ["word " * 600], "truncate": False}).status_code == 422
        rep = c.get("/v1/usage").json()
    assert rep["total"]["tokens"] == got and rep["total"]["requests"] == 8
    assert rep["data"][0]["key"] == kid and rep["prices"]["tiny"] == 0.01
    assert rep["total"]["cost_usd"] == pytest.approx(got * 0.01 / 1e6)
    assert acc.ledger_tokens(key_label=kid) == (got, 8)
    # the rows are committed to the file: a fresh connection (another process could be it) sees them
    from e5kit.service.ledger import Ledger

    from conftest import Accounts

    fresh = Accounts(acc.url)
    try:
        rep2 = Ledger(fresh.db).report(key_label=kid, group_by="month")
    finally:
        fresh.engine.dispose()
    assert rep2["total"]["tokens"] == got and rep2["data"][0]["period"] == dt.date.today().strftime("%Y-%m")


def test_a_response_that_fails_to_render_is_not_billed(tiny_bert, tmp_path):
    """Metering is the last step: a request that fails after its vectors are computed (here its
    response cannot be rendered because the render pool is busy: 429) writes nothing to the ledger."""
    acc = Accounts(f"sqlite:///{tmp_path / 'service.db'}")
    acc.user("render@example.com")
    key, kid = acc.key("render@example.com")
    # 800 x 32 floats: a response over 256 KiB, so it is rendered in the pool, whose backlog is
    # bounded by twice the body limit (200 kB here)
    app = create_service_app([("tiny", E5(str(tiny_bert)))], ServiceConfig(acc.url, cookie_secure=False),
                             ServerConfig(max_body_bytes=100_000))
    server = InProcessServer(app, key=key)
    gate = threading.Event()
    texts = [f"text {i}" for i in range(800)]
    try:
        # another request's work holds one pool thread (the other one tokenizes)
        busy = asyncio.run_coroutine_threadsafe(server.service.run(gate.wait, cost=1), server.loop)
        for path, body in (("/v1/embeddings", {"input": texts}), ("/embed", {"inputs": texts})):
            r = server.client.post(path, json=body, headers=server.headers)
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
            assert r.headers["Retry-After"] == "1"
        assert acc.ledger_tokens(key_label=kid) == (0, 0)
        gate.set()
        busy.result(10)
        r = server.client.post("/v1/embeddings", json={"input": texts}, headers=server.headers)
        assert r.status_code == 200 and len(r.json()["data"]) == 800
        assert acc.ledger_tokens(key_label=kid) == (r.json()["usage"]["prompt_tokens"], 1)
    finally:
        gate.set()
        server.stop()
        acc.engine.dispose()


def test_key_file_usage_goes_to_the_ledger(sqlite_service):
    server, acc = sqlite_service
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "from the key file"},
                   headers=bearer("sk-file-0123456789"), timeout=30)
    assert r.status_code == 200
    n = r.json()["usage"]["prompt_tokens"]
    rep = httpx.get(server.url + "/v1/usage", headers=bearer("sk-file-0123456789"), timeout=30).json()
    assert rep["key"] == "file:filekey" and rep["total"]["tokens"] == n
    assert acc.ledger_tokens(key_label="file:filekey")[0] == n


def test_idempotency_key_bills_once(sqlite_service):
    server, acc = sqlite_service
    acc.user("idem@example.com")
    key, kid = acc.key("idem@example.com")
    rid = str(uuid.uuid4())
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as c:
        a = c.post("/v1/embeddings", json={"input": "same request"}, headers={"Idempotency-Key": rid})
        b = c.post("/v1/embeddings", json={"input": "same request"}, headers={"Idempotency-Key": rid})
    assert a.status_code == b.status_code == 200
    assert acc.ledger_tokens(key_label=kid) == (a.json()["usage"]["prompt_tokens"], 1)


def test_rate_limit_and_quota(sqlite_service):
    server, acc = sqlite_service
    acc.user("limited@example.com", monthly_quota=60)
    key, kid = acc.key("limited@example.com", rps_limit=2)
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as c:
        codes = [c.post("/v1/embeddings", json={"input": "quick"}) for _ in range(6)]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in limited)
        assert limited[0].headers["Retry-After"] == "1"
        assert sum(r.status_code == 200 for r in codes) <= 4  # 2 per second, the loop spans at most 2 windows
        # spend the monthly quota (60 tokens), slowly enough for the rate limit
        billed, refused = 0, None
        for _ in range(40):
            r = c.post("/v1/embeddings", json={"input": "spend the quota now"})
            if r.status_code == 200:
                billed += r.json()["usage"]["prompt_tokens"]
            elif r.json()["error"]["code"] == "insufficient_quota":
                refused = r
                break
            else:
                import time

                time.sleep(0.5)
    assert refused is not None and refused.status_code == 429
    assert refused.json()["error"]["type"] == "insufficient_quota" and int(refused.headers["Retry-After"]) > 0
    total, _ = acc.ledger_tokens(key_label=kid)
    assert total <= 60
    assert total == billed + sum(r.json()["usage"]["prompt_tokens"] for r in codes if r.status_code == 200)


def test_login_session_and_csrf(sqlite_service):
    server, acc = sqlite_service
    acc.user("web@example.com")
    c, r = login(server.url, "web@example.com")
    assert r.status_code == 303 and r.headers["location"] == "/account"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    csrf = page_csrf(c)
    assert csrf
    # the playground's call: the session cookie plus the CSRF header
    r = c.post("/embed", json={"inputs": ["from the page"]}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    # without the header, or with a wrong one: refused, not billed
    before = acc.ledger_tokens(key_label=f"session:{_uid(acc, 'web@example.com')}")
    assert c.post("/embed", json={"inputs": ["x"]}).status_code == 403
    assert c.post("/embed", json={"inputs": ["x"]}, headers={"X-CSRF-Token": csrf + "x"}).status_code == 403
    assert c.post("/account/keys", data={"label": "no token"}).status_code == 403
    assert c.post("/account/keys", data={"label": "bad", "csrf": "nope"}).status_code == 403
    assert acc.ledger_tokens(key_label=f"session:{_uid(acc, 'web@example.com')}") == before
    # a key made on the account page works once shown, and revoking it from the page ends it
    r = c.post("/account/keys", data={"label": "from the page", "csrf": csrf})
    assert r.status_code == 201
    new_key = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "k"}, headers=bearer(new_key)).status_code == 200
    assert new_key not in c.get("/account").text  # shown once
    kid = new_key.split("_")[1]
    assert c.post(f"/account/keys/{kid}/revoke", data={"csrf": csrf}).status_code == 303
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "k"}, headers=bearer(new_key))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    page = c.get("/account").text
    assert "<svg" in page and 'class="bar"' in page
    # logout needs the token too, then the session is gone
    assert c.post("/logout", data={}).status_code == 403
    assert c.post("/logout", data={"csrf": csrf}).status_code == 303
    assert c.post("/embed", json={"inputs": ["x"]}, headers={"X-CSRF-Token": csrf}).status_code == 401


def _uid(acc, email):
    from e5kit.service.accounts import get_user

    return get_user(acc.db, email).id


def test_wrong_password_expired_session_and_login_throttle(sqlite_service):
    server, acc = sqlite_service
    acc.user("victim@example.com")
    c, r = login(server.url, "victim@example.com", "wrong password")
    assert r.status_code == 401 and "Wrong email or password" in r.text and "set-cookie" not in {
        k.lower() for k in r.headers if r.headers[k].startswith("e5kit_session")}
    assert c.get("/account", follow_redirects=False).status_code == 303
    # a session that has expired is refused everywhere
    c2, r = login(server.url, "victim@example.com")
    assert r.status_code == 303
    csrf = page_csrf(c2)
    with acc.db.begin() as s:
        for ws in s.query(WebSession).filter(WebSession.user_id == _uid(acc, "victim@example.com")):
            ws.expires_at = dt.datetime(2000, 1, 1)
    assert c2.post("/embed", json={"inputs": ["x"]}, headers={"X-CSRF-Token": csrf}).status_code == 401
    assert c2.get("/account", follow_redirects=False).headers["location"].startswith("/login")
    # repeated failures are throttled (5 per 5 minutes), even with the right password afterwards
    codes = [login(server.url, "victim@example.com", f"guess {i}")[1].status_code for i in range(6)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429
    r = login(server.url, "victim@example.com")[1]
    assert r.status_code == 429 and r.headers["Retry-After"]


def test_key_revoked_elsewhere_ends_within_the_key_cache_time(sqlite_service):
    """A key's lookup is reused for ServiceConfig.key_cache_seconds (one query per key and second,
    not per request); revoked from another process (`e5kit keys revoke`) it is refused after that."""
    from e5kit.service.accounts import revoke_key

    server, acc = sqlite_service
    acc.user("cached@example.com")
    key, kid = acc.key("cached@example.com")
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "a"}, headers=bearer(key)).status_code == 200
    revoke_key(acc.db, kid)
    revoked_at = time.monotonic()
    deadline = revoked_at + ServiceConfig.key_cache_seconds + 5  # the cache time plus a slow CI machine's latency
    while True:
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "b"}, headers=bearer(key))
        if r.status_code == 401:
            break
        assert r.status_code == 200 and time.monotonic() < deadline
        time.sleep(0.05)
    assert r.json()["error"]["code"] == "invalid_api_key"
    assert all(httpx.post(server.url + "/v1/embeddings", json={"input": "c"}, headers=bearer(key)).status_code == 401
               for _ in range(3))


def test_other_accounts_usage_is_not_readable(sqlite_service):
    server, acc = sqlite_service
    acc.user("a@example.com")
    acc.user("b@example.com")
    ka, ida = acc.key("a@example.com")
    kb, idb = acc.key("b@example.com")
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "a's text"}, headers=bearer(ka)).status_code == 200
    r = httpx.get(server.url + f"/v1/usage?key={ida}", headers=bearer(kb))
    assert r.status_code == 404 and ida not in r.text.replace(f"key={ida}", "")
    mine = httpx.get(server.url + "/v1/usage?scope=account", headers=bearer(kb)).json()
    assert mine["total"]["tokens"] == 0 and mine["data"] == []
    # a's own call with its key id works
    assert httpx.get(server.url + f"/v1/usage?key={ida}", headers=bearer(ka)).json()["total"]["requests"] == 1


def test_sql_metacharacters_everywhere(sqlite_service):
    server, acc = sqlite_service
    uid = acc.user("safe@example.com").id
    key, kid = acc.key("safe@example.com")
    # the login's `next` (only a path on this site is followed) and a key label (stored verbatim)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for bad in SQLI:
            for nxt, where in ((bad, "/account"), ("/" + bad, "/" + bad)):
                form = c.get("/login", params={"next": nxt})
                assert form.status_code == 200
                csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
                r = c.post("/login", data={"email": "safe@example.com", "password": PASSWORD, "csrf": csrf, "next": nxt})
                assert r.status_code == 303 and unquote(r.headers["location"]) == where
            r = c.post("/account/keys", data={"label": bad, "csrf": page_csrf(c)})
            assert r.status_code == 201 and "Traceback" not in r.text
            made = re.search(r'id="new-key">([^<]+)<', r.text).group(1)
            assert httpx.get(server.url + "/v1/usage", headers=bearer(made)).status_code == 200
    assert sorted(k.label for k in list_keys(acc.db, uid) if k.label) == sorted(SQLI)
    before = acc.ledger_tokens()
    for bad in SQLI:
        assert login(server.url, bad, bad)[1].status_code in (401, 429)  # 429: this address is throttled
        assert login(server.url, "safe@example.com", bad)[1].status_code in (401, 429)
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=bearer(f"e5k_{bad}_{bad}"))
        assert r.status_code == 401
        r = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=bearer(f"e5k_{kid}_{bad}"))
        assert r.status_code == 401
        for q in ({"key": bad}, {"model": bad}, {"since": bad}, {"until": bad}, {"group_by": bad}, {"scope": bad},
                  {"group_by": "total"}):
            r = httpx.get(server.url + "/v1/usage", params=q, headers=bearer(key))
            assert r.status_code in (200, 400, 404), r.text
            assert "secret_hash" not in r.text.replace(bad, "") and "Traceback" not in r.text
            if r.status_code == 200:
                assert r.json()["total"]["requests"] == 0
        r = httpx.post(server.url + "/v1/embeddings", json={"input": bad, "model": bad, "user": bad}, headers=bearer(key))
        assert r.status_code == 404
    after = acc.ledger_tokens()
    assert after == before  # nothing billed, tables intact
    # as Idempotency-Keys: each billed once, however often it is sent
    got = 0
    for bad in SQLI:
        rs = [httpx.post(server.url + "/v1/embeddings", json={"input": "idempotent"},
                         headers={**bearer(key), "Idempotency-Key": bad}) for _ in range(2)]
        assert [r.status_code for r in rs] == [200, 200]
        got += rs[0].json()["usage"]["prompt_tokens"]
    assert acc.ledger_tokens() == (after[0] + got, after[1] + len(SQLI))
    assert "Traceback" not in server.log()


def test_keys_never_logged(sqlite_service):
    server, acc = sqlite_service
    acc.user("logs@example.com")
    key, _ = acc.key("logs@example.com")
    httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=bearer(key))
    httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=bearer(key + "wrong"))
    secret = key.split("_", 2)[2]
    assert secret not in server.log() and "sk-file-0123456789" not in server.log()


def test_model_pages(sqlite_service):
    server, _ = sqlite_service
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "$0.010 per million tokens" in r.text and "512 tokens" in r.text
    assert "You need to" in r.text and "login" in r.text and "query: " in r.text
    page = httpx.get(server.url + "/models/tiny").text
    assert 'id="model-name">tiny<' in page and 'data-model="tiny"' in page
    assert httpx.get(server.url + "/models/nope").status_code == 404
    assert httpx.get(server.url + "/static/playground.js").status_code == 200
    assert "cdn" not in r.text.lower() and "https://" not in r.text.replace("https://arxiv.org", "")


def test_tokens_per_minute_limit(sqlite_service):
    server, acc = sqlite_service
    acc.user("tpm@example.com")
    key, kid = acc.key("tpm@example.com", tpm_limit=50)
    billed, refused = 0, None
    import time

    minute0 = int(time.time() // 60)
    with httpx.Client(base_url=server.url, headers=bearer(key), timeout=30) as c:
        for _ in range(30):
            r = c.post("/v1/embeddings", json={"input": "tokens per minute"})
            if r.status_code != 200:
                refused = r
                break
            billed += r.json()["usage"]["prompt_tokens"]
    assert refused is not None and refused.status_code == 429, "the tokens/min limit never refused"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and "per minute" in refused.json()["error"]["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    windows = int(time.time() // 60) - minute0 + 1  # the loop may cross a minute boundary
    assert acc.ledger_tokens(key_label=kid)[0] == billed <= 50 * windows
