"""`e5kit accounts` and `e5kit keys` on a SQLite file (click's runner, the real commands)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from e5kit.cli import main
from e5kit.service import accounts
from e5kit.service.db import open_db


def test_accounts_and_keys_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = CliRunner().invoke
    r = run(main, ["accounts", "create", "ops@example.com", "--database-url", url, "--monthly-quota", "1000"],
            env={"E5KIT_PASSWORD": "a long password"})
    assert r.exit_code == 0, r.output
    assert run(main, ["accounts", "create", "ops@example.com", "--database-url", url],
               env={"E5KIT_PASSWORD": "a long password"}).exit_code == 1  # exists already
    assert run(main, ["accounts", "create", "short@example.com", "--database-url", url],
               env={"E5KIT_PASSWORD": "short"}).exit_code == 1
    r = run(main, ["keys", "create", "ops@example.com", "--label", "prod", "--json", "--database-url", url])
    made = json.loads(r.output)
    assert made["key"].startswith(f"e5k_{made['id']}_")
    listing = run(main, ["keys", "list", "--database-url", url]).output
    assert made["id"] in listing and "prod" in listing and "active" in listing
    assert made["key"].split("_", 2)[2] not in listing  # the secret is never shown again
    engine, db = open_db(url)
    try:
        with db() as s:
            assert accounts.check_key(s, made["key"]) is not None
            row = s.get(accounts.ApiKey, 1)
            assert made["key"] not in (row.secret_hash, row.public_id)  # stored hashed
        assert accounts.authenticate(db, "ops@example.com", "a long password") is not None
        assert accounts.get_user(db, "ops@example.com").password_hash.startswith("$argon2")
        assert run(main, ["keys", "revoke", made["id"], "--database-url", url]).exit_code == 0
        with db() as s:
            assert accounts.check_key(s, made["key"]) is None
        assert "revoked" in run(main, ["keys", "list", "ops@example.com", "--database-url", url]).output
        assert run(main, ["keys", "revoke", "nope", "--database-url", url]).exit_code == 1
        assert "monthly_quota=1000" in run(main, ["accounts", "list", "--database-url", url]).output
    finally:
        engine.dispose()
