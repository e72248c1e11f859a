"""Server throughput with the usage ledger on (SQLite file, PostgreSQL) as a ratio to the ledger off.

Same model, texts and load generator as bench_server.py (64 clients in closed loops, one SciFact
passage per request, `input_type: passage`), one run after the other on the same machine:
ledger off, SQLite, PostgreSQL (a private cluster from the system's packages), ledger off again.
The ratio is to the mean of the two ledger-off runs. Every 200 is committed to the ledger before it
is sent; at the end the ledger's token total is checked against the tokens the clients received.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_service.py --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests" / "service"))
from bench_server import Server, build_random_e5_small, load, scifact_passages  # noqa: E402


def _account(url: str) -> tuple[str, str]:
    from e5kit.service.accounts import create_key, create_user
    from e5kit.service.db import open_db

    engine, db = open_db(url)
    create_user(db, "bench@example.com", "bench-password")
    secret, key = create_key(db, "bench@example.com", "bench")
    engine.dispose()
    return secret, key.public_id


def _ledger_tokens(url: str, label: str) -> int:
    from e5kit.service.db import open_db
    from e5kit.service.ledger import Ledger

    engine, db = open_db(url)
    try:
        return Ledger(db).report(key_label=label, group_by="total")["total"]["tokens"]
    finally:
        engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="e5kit-bench-service-"))
    model = args.model or build_random_e5_small(ROOT / ".bench" / "random-e5-small")
    texts = scifact_passages(2000)
    from pg import Postgres

    pg = Postgres()
    rows = []
    try:
        for name, url in [("off", None), ("sqlite", f"sqlite:///{work / 'ledger.db'}"), ("postgresql", pg.url),
                          ("off", None)]:
            extra = ["--threads", str(args.threads)]
            headers = None
            if url:
                key, label = _account(url)
                extra += ["--database-url", url, "--price", "bench=0.01"]
                headers = {"Authorization": f"Bearer {key}"}
            server = Server(model, extra, work / f"{name}.log")
            try:
                asyncio.run(load(server.url, texts, 4, 1, 3.0, server, headers=headers))  # warm-up
                r = asyncio.run(load(server.url, texts, args.clients, 1, args.duration, server, headers=headers))
            finally:
                server.stop()
            r["ledger"] = name
            if url:  # everything the clients got (warm-up included) is in the ledger
                r["ledger_tokens"] = _ledger_tokens(url, label)
            rows.append(r)
            print(f"{name:10s} {r['req_per_s']:8.1f} req/s {r['tokens_per_s']:9.0f} tok/s p50 {r['p50_ms']:.0f} ms "
                  f"p99 {r['p99_ms']:.0f} ms errors {r['errors']}", flush=True)
    finally:
        pg.stop()
    base = (rows[0]["tokens_per_s"] + rows[-1]["tokens_per_s"]) / 2
    print("\n| ledger | clients | req/s | tokens/s | p50 ms | p99 ms | vs ledger off |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['ledger']} | {r['clients']} | {r['req_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['p50_ms']:.0f} | "
              f"{r['p99_ms']:.0f} | {r['tokens_per_s'] / base:.1%} |")


if __name__ == "__main__":
    main()
