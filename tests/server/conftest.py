"""Fixtures: real `e5kit serve` processes for the server tests (see server_helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e5kit.loading import write_metadata
from server_helpers import ALICE_KEY, KEY, ServerProcess


@pytest.fixture(scope="session")
def tiny_instruct(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT marked as an instruct model (e5kit.json), to check the task template."""
    out = tmp_path_factory.mktemp("tiny-instruct") / "model"
    shutil.copytree(tiny_bert, out)
    write_metadata(out, "instruct")
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_bert, tiny_xlmr, tiny_instruct, tmp_path_factory):
    """Three tiny models, two API keys (one from a key file), a 1 MB body limit, a price."""
    d = tmp_path_factory.mktemp("tiny-server")
    keyfile = d / "keys.txt"
    keyfile.write_text(f"# test keys\nalice {ALICE_KEY}\n", encoding="utf-8")
    server = ServerProcess(
        ["-m", f"tiny={tiny_bert}", "-m", f"xlmr={tiny_xlmr}", "-m", f"inst={tiny_instruct}",
         "--api-key", KEY, "--api-key-file", str(keyfile), "--max-body-bytes", "1000000",
         "--price-per-million", "0.01", "--threads", "1"],
        d / "server.log", key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ml_server(ml_e5, tmp_path_factory):
    """The real multilingual-e5-small, no keys, a small queue (6000 tokens) so 429 is reachable; one
    thread, so that a 3k-token job keeps the model busy long enough (~1 s) for the backpressure test."""
    d = tmp_path_factory.mktemp("ml-server")
    server = ServerProcess(["-m", f"ml={ml_e5}", "--max-queued-tokens", "6000", "--max-batch-tokens", "4096",
                            "--threads", "1"], d / "server.log")
    yield server
    server.stop()
