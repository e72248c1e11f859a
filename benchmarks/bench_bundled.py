"""Load time of the bundled default model: first run (check + dequantize + write + load) vs later
runs (check + load) vs loading the same checkpoint directory as a plain local path.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_bundled.py --rounds 3

Each measurement is a fresh process timing ``E5(...)`` after ``import e5kit`` (import printed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, time
t0 = time.perf_counter()
from e5kit import E5
t1 = time.perf_counter()
m = E5({model!r})
t2 = time.perf_counter()
m.encode_queries(["how much protein should a female eat"])
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1, "path": str(m.engine.checkpoint.path)}}))
"""


def probe(model: str, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), E5KIT_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", PROBE.format(model=model)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="e5kit-bench-cache-") as tmp:
        cache = Path(tmp)
        first = probe("multilingual-e5-small-q4", cache)
        later, local = [], []
        for _ in range(args.rounds):  # alternate, so contention hits both sides alike
            later.append(probe("multilingual-e5-small-q4", cache))
            local.append(probe(first["path"], cache))
    rows = [("first run (dequantize + write + load)", [first]), ("later run (bundled name)", later),
            ("same directory as a local path", local)]
    print("| E5(...) in a fresh process | load s (median) | import e5kit s |")
    print("| --- | ---: | ---: |")
    for name, runs in rows:
        print(f"| {name} | {statistics.median(r['load_s'] for r in runs):.2f} | "
              f"{statistics.median(r['import_s'] for r in runs):.2f} |")
    ratio = statistics.median(r["load_s"] for r in later) / statistics.median(r["load_s"] for r in local)
    print(f"\nlater / local: {ratio:.2f}x; rounds {args.rounds}; later loads "
          f"{[round(r['load_s'], 2) for r in later]}, local {[round(r['load_s'], 2) for r in local]}")


if __name__ == "__main__":
    main()
