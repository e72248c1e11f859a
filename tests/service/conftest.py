"""Fixtures for the hosted-service tests: real `e5kit serve --database-url` processes on 127.0.0.1,
a SQLite file, and a private PostgreSQL cluster from Debian's packages (skipped when absent)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_helpers import ServerProcess  # noqa: E402

from pg import Postgres, PostgresUnavailable  # noqa: E402

from e5kit.service.accounts import create_key, create_user  # noqa: E402
from e5kit.service.db import open_db  # noqa: E402

PASSWORD = "correct horse battery"
ARTIFACTS = Path(os.environ.get("E5KIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


class Accounts:
    """Direct access to a service database, as `e5kit accounts` / `e5kit keys` would use it."""

    def __init__(self, url: str):
        self.url = url
        self.engine, self.db = open_db(url)

    def user(self, email: str, password: str = PASSWORD, **limits):
        return create_user(self.db, email, password, **limits)

    def key(self, email: str, label: str = "", **limits) -> tuple[str, str]:
        secret, row = create_key(self.db, email, label, **limits)
        return secret, row.public_id

    def ledger_tokens(self, **where) -> int:
        from sqlalchemy import func, select

        from e5kit.service.db import Usage

        q = select(func.coalesce(func.sum(Usage.tokens), 0), func.count(Usage.id))
        for k, v in where.items():
            q = q.where(getattr(Usage, k) == v)
        with self.db() as s:
            return tuple(int(x) for x in s.execute(q).one())

    def counters(self, scope: str) -> dict[int, int]:
        """The limit counter ``scope`` (e.g. ``key <id>:t``): period -> value."""
        from sqlalchemy import select

        from e5kit.service.db import Counter

        with self.db() as s:
            return dict(s.execute(select(Counter.period, Counter.value).where(Counter.scope == scope)).all())


def serve(model_dir: Path, url: str, log: Path, *extra: str) -> ServerProcess:
    return ServerProcess(["-m", f"tiny={model_dir}", "--database-url", url, "--price", "tiny=0.01", "--threads", "1",
                          "--no-cookie-secure", *extra], log)


@pytest.fixture(scope="session")
def sqlite_service(tiny_bert, tmp_path_factory):
    """One server on a SQLite file, with a key file too; the database's Accounts helper."""
    d = tmp_path_factory.mktemp("svc-sqlite")
    url = f"sqlite:///{d / 'service.db'}"
    acc = Accounts(url)
    keyfile = d / "keys.txt"
    keyfile.write_text("filekey sk-file-0123456789\n", encoding="utf-8")
    server = serve(tiny_bert, url, d / "server.log", "--api-key-file", str(keyfile))
    yield server, acc
    server.stop()
    acc.engine.dispose()


# ---- PostgreSQL ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def postgres_url():
    """A private PostgreSQL cluster in a temp dir on 127.0.0.1 (as the postgres user when run as root)."""
    try:
        pg = Postgres()
    except PostgresUnavailable as e:
        pytest.skip(f"[required] {e}")
    try:
        yield pg.url
    finally:
        pg.stop()


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False
