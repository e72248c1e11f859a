"""Two `e5kit serve` replicas sharing a real PostgreSQL: the ledger under 32 concurrent clients,
limits that hold across both, and `kill -9` of one replica mid-load."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import Accounts, serve

CLIENTS = 32
LOAD_SECONDS = 5.0
MAX_PER_CLIENT = 60


@pytest.fixture(scope="module")
def replicas(postgres_url, tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("svc-pg")
    acc = Accounts(postgres_url)
    with ThreadPoolExecutor(2) as ex:  # start both at once (each runs the migrations; they take turns)
        a, b = ex.map(lambda n: serve(tiny_bert, postgres_url, d / f"{n}.log"), ["a", "b"])
    servers = {"a": a, "b": b}
    yield servers, acc, d
    for s in servers.values():
        s.stop()
    acc.engine.dispose()


class Load:
    """CLIENTS threads sending bounded embedding requests, each with an Idempotency-Key, to the
    replicas in turn (client n uses keys[n % len(keys)]); a request whose connection fails is
    retried (same Idempotency-Key) on the other replica."""

    def __init__(self, urls: list[str], keys: str | list[str]):
        self.urls = urls
        self.keys = [keys] if isinstance(keys, str) else keys
        self.received: dict[str, int] = {}  # request id -> usage.prompt_tokens of its 200
        self.statuses: list[int] = []
        self.replies: dict[str, list[httpx.Response]] = {k: [] for k in self.keys}
        self.retried = 0
        self.lock = threading.Lock()

    def one(self, c: httpx.Client, i: int, text: str, key: str) -> None:
        rid = str(uuid.uuid4())
        for attempt in range(6):
            url = self.urls[(i + attempt) % len(self.urls)]
            try:
                r = c.post(url + "/v1/embeddings", json={"input": [text, text + " again"]},
                           headers={"Authorization": f"Bearer {key}", "Idempotency-Key": rid})
            except httpx.TransportError:
                with self.lock:
                    self.retried += 1
                time.sleep(0.05)
                continue
            with self.lock:
                self.statuses.append(r.status_code)
                self.replies[key].append(r)
                if r.status_code == 200:
                    self.received[rid] = r.json()["usage"]["prompt_tokens"]
            return

    def run(self, seconds: float = LOAD_SECONDS, clients: int = CLIENTS) -> None:
        deadline = time.monotonic() + seconds

        def client(n: int):
            key = self.keys[n % len(self.keys)]
            with httpx.Client(timeout=30) as c:
                for i in range(MAX_PER_CLIENT):
                    if time.monotonic() > deadline:
                        return
                    self.one(c, n + i, f"client {n} request {i} " + "word " * (n % 7), key)

        with ThreadPoolExecutor(clients) as ex:
            list(ex.map(client, range(clients)))


def test_ledger_exact_under_32_clients_on_two_replicas(replicas):
    servers, acc, _ = replicas
    acc.user("load@example.com")
    key, kid = acc.key("load@example.com")
    load = Load([servers["a"].url, servers["b"].url], key)
    load.run()
    assert len(load.received) >= CLIENTS and set(load.statuses) == {200}  # every client got answers through
    tokens, rows = acc.ledger_tokens(key_label=kid)
    assert tokens == sum(load.received.values()) and rows == len(load.received)
    for s, group in zip(servers.values(), ("day", "total")):  # each replica reads the same shared ledger
        rep = httpx.get(s.url + f"/v1/usage?group_by={group}", headers={"Authorization": f"Bearer {key}"},
                        timeout=30).json()
        assert rep["total"]["tokens"] == tokens


def test_limits_hold_across_replicas(replicas):
    """32 clients on both replicas at once, over three keys: one with its account's monthly quota,
    one with requests/s, one with tokens/min. Each limit holds exactly: the shared counter of every
    window stays within the limit and equals the ledger, the ledger equals the 200s received, and
    every refusal is a 429 with Retry-After, not billed."""
    servers, acc, _ = replicas
    uid = acc.user("quota@example.com", monthly_quota=500).id
    quota_key, quota_id = acc.key("quota@example.com")
    acc.user("rps@example.com")
    rps_key, rps_id = acc.key("rps@example.com", rps_limit=4)
    acc.user("tpm@example.com")
    tpm_key, tpm_id = acc.key("tpm@example.com", tpm_limit=300)
    load = Load([servers["a"].url, servers["b"].url], [quota_key, rps_key, tpm_key])
    t0 = time.time()
    load.run(seconds=4)
    seconds, minutes = int(time.time()) - int(t0) + 1, int(time.time() // 60) - int(t0 // 60) + 1
    billed = {}
    for key, kid, code in ((quota_key, quota_id, "insufficient_quota"), (rps_key, rps_id, "rate_limit_exceeded"),
                           (tpm_key, tpm_id, "rate_limit_exceeded")):
        ok = [r for r in load.replies[key] if r.status_code == 200]
        refused = [r for r in load.replies[key] if r.status_code != 200]
        assert ok and refused, (kid, len(ok), len(refused))
        assert all(r.status_code == 429 and r.json()["error"]["code"] == code and int(r.headers["Retry-After"]) > 0
                   for r in refused), {(r.status_code, r.text) for r in refused}
        billed[key] = sum(r.json()["usage"]["prompt_tokens"] for r in ok)
        assert acc.ledger_tokens(key_label=kid) == (billed[key], len(ok))  # refusals are not billed
    # the account's monthly quota: one counter, equal to the ledger, filled to within one request
    quota = acc.counters(f"account {uid}:m")
    assert list(quota.values()) == [billed[quota_key]] and 500 - 40 <= billed[quota_key] <= 500
    # requests/s of one key: at most 4 admitted in any second, on both replicas together
    rps = acc.counters(f"key {rps_id}:r")
    assert max(rps.values()) <= 4 and sum(rps.values()) == len([r for r in load.replies[rps_key] if r.status_code == 200])
    assert len(rps) <= seconds and all(r.headers["Retry-After"] == "1" for r in load.replies[rps_key] if r.status_code == 429)
    # tokens/min of one key: every minute's counter within the limit, all of them equal to the ledger
    tpm = acc.counters(f"key {tpm_id}:t")
    assert max(tpm.values()) <= 300 and sum(tpm.values()) == billed[tpm_key] and len(tpm) <= minutes


def test_group_commits_of_two_replicas_never_deadlock(postgres_url):
    """Two ledgers (two replicas' group commits) charge the same two keys' token counters with batches
    in opposite orders: the counters are locked in one order, so PostgreSQL aborts none as a deadlock
    and every request is billed once."""
    from e5kit.service.accounts import Identity
    from e5kit.service.ledger import Ledger
    from e5kit.service.limits import Limits

    dbs = [Accounts(postgres_url) for _ in range(2)]
    callers = [Identity(key_id=f"file:deadlock-{n}", kind="file",
                        limits=((f"key deadlock-{n}", Limits(tpm=10**9, monthly_quota=10**12)),)) for n in "ab"]
    ledgers = [Ledger(d.db) for d in dbs]
    rounds, burst = 20, 40

    def send(ledger: Ledger, first: int) -> list:
        futures = [ledger.submit(callers[(first + i) % 2], "tiny", 1, 1) for i in range(burst)]
        return [f.result(60) for f in futures]

    try:
        with ThreadPoolExecutor(2) as ex:
            for _ in range(rounds):
                assert all(all(res) for res in ex.map(send, ledgers, (0, 1)))
        n = rounds * burst  # per key: half of each burst on each replica
        assert [dbs[0].ledger_tokens(key_label=c.key_id) for c in callers] == [(n, n), (n, n)]
    finally:
        for d in dbs:
            d.engine.dispose()


def test_kill_9_mid_load_loses_nothing(replicas, tiny_bert, postgres_url):
    servers, acc, d = replicas
    acc.user("crash@example.com")
    key, kid = acc.key("crash@example.com")
    load = Load([servers["a"].url, servers["b"].url], key)
    killer = threading.Timer(1.5, servers["a"].proc.kill)  # SIGKILL: no drain, no cleanup
    killer.start()
    load.run(seconds=4)
    killer.join()
    assert servers["a"].proc.wait(10) == -9
    assert load.retried > 0  # some requests were cut by the kill
    tokens, rows = acc.ledger_tokens(key_label=kid)
    assert tokens == sum(load.received.values()) and rows == len(load.received)
    # restart the killed replica: it reads the same exact ledger
    servers["a"] = serve(tiny_bert, postgres_url, d / "a2.log")
    rep = httpx.get(servers["a"].url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert rep["total"]["tokens"] == sum(load.received.values())
