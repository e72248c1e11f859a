"""Server throughput with the usage ledger on (SQLite file, PostgreSQL) as a ratio to the ledger off.

Same model, texts and load generator as bench_server.py (64 clients in closed loops, one SciFact
passage per request, `input_type: passage`). Three servers run side by side: ledger off, SQLite
file, PostgreSQL (a private cluster from the system's packages); in each round each one takes the
load in turn (order rotated per round), and the ratio is total tokens/s over all rounds against
ledger off. Every 200 of the ledger runs was committed to the ledger before it was sent.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_service.py --rounds 3 --duration 10
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
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per configuration per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="e5kit-bench-service-"))
    model = args.model or build_random_e5_small(ROOT / ".bench" / "random-e5-small")
    texts = scifact_passages(2000)
    from pg import Postgres

    pg = Postgres()
    configs = {"off": None, "sqlite": f"sqlite:///{work / 'ledger.db'}", "postgresql": pg.url}
    servers, headers, labels = {}, {}, {}
    totals = {name: {"tokens": 0.0, "requests": 0, "seconds": 0.0, "errors": 0, "p50": []} for name in configs}
    try:
        # All three servers stay up; only the one under load works. Rounds rotate the order so that
        # drift on a shared machine hits every configuration alike.
        for name, url in configs.items():
            extra = ["--threads", str(args.threads)]
            headers[name] = None
            if url:
                key, labels[name] = _account(url)
                extra += ["--database-url", url, "--price", "bench=0.01"]
                headers[name] = {"Authorization": f"Bearer {key}"}
            servers[name] = Server(model, extra, work / f"{name}.log")
            asyncio.run(load(servers[name].url, texts, 4, 1, 3.0, servers[name], headers=headers[name]))  # warm-up
        names = list(configs)
        for r in range(args.rounds):
            order = names[r % 3:] + names[:r % 3]
            for name in order:
                res = asyncio.run(load(servers[name].url, texts, args.clients, 1, args.duration, servers[name],
                                       headers=headers[name]))
                t = totals[name]
                t["tokens"] += res["tokens_per_s"] * res["seconds"]
                t["requests"] += res["requests_ok"]
                t["seconds"] += res["seconds"]
                t["errors"] += res["errors"]
                t["p50"].append(res["p50_ms"])
                print(f"round {r + 1} {name:10s} {res['tokens_per_s']:8.0f} tok/s {res['req_per_s']:6.1f} req/s "
                      f"p50 {res['p50_ms']:.0f} ms errors {res['errors']}", flush=True)
        for name in ("sqlite", "postgresql"):
            print(f"{name} ledger rows hold {_ledger_tokens(configs[name], labels[name])} tokens")
    finally:
        for s in servers.values():
            s.stop()
        pg.stop()
    base = totals["off"]["tokens"] / totals["off"]["seconds"]
    print(f"\n{args.rounds} rounds x {args.duration:.0f} s per configuration, {args.clients} clients, 1 passage per request")
    print("| ledger | tokens/s | req/s | median p50 ms | errors | vs ledger off |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, t in totals.items():
        tps = t["tokens"] / t["seconds"]
        p50 = sorted(t["p50"])[len(t["p50"]) // 2]
        print(f"| {name} | {tps:.0f} | {t['requests'] / t['seconds']:.1f} | {p50:.0f} | {t['errors']} | {tps / base:.1%} |")


if __name__ == "__main__":
    main()
