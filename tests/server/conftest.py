"""Fixtures: the app in-process (most tests) and real `e5kit serve` processes (lifecycle, the real
network stack). See inprocess.py and server_helpers.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from e5kit import E5
from e5kit.loading import write_metadata
from e5kit.server import KeyStore, ServerConfig, create_app
from inprocess import InProcessServer
from server_helpers import ALICE_KEY, KEY, ServerProcess


@pytest.fixture(scope="session")
def tiny_instruct(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT marked as an instruct model (e5kit.json), to check the task template."""
    out = tmp_path_factory.mktemp("tiny-instruct") / "model"
    shutil.copytree(tiny_bert, out)
    write_metadata(out, "instruct")
    return out


@pytest.fixture(scope="session")
def tiny_server(tiny_bert, tiny_xlmr, tiny_instruct):
    """In-process: three tiny models, two API keys (one labelled), a 1 MB body limit, a price."""
    keys = KeyStore({"main": KEY, "alice": ALICE_KEY})
    app = create_app([("tiny", E5(str(tiny_bert))), ("xlmr", E5(str(tiny_xlmr))), ("inst", E5(str(tiny_instruct)))],
                     ServerConfig(max_body_bytes=1_000_000, price_per_million=0.01), keys)
    server = InProcessServer(app, key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_process(tiny_bert, tiny_instruct, tmp_path_factory):
    """A real `e5kit serve` process (tiny + inst, one key), for clients that need a real URL."""
    d = tmp_path_factory.mktemp("tiny-process")
    server = ServerProcess(["-m", f"tiny={tiny_bert}", "-m", f"inst={tiny_instruct}", "--api-key", KEY,
                            "--threads", "1"], d / "server.log", key=KEY)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ml_server(ml_e5, tmp_path_factory):
    """A real `e5kit serve` process with the real multilingual-e5-small, no keys."""
    d = tmp_path_factory.mktemp("ml-server")
    server = ServerProcess(["-m", f"ml={ml_e5}", "--max-batch-tokens", "4096", "--threads", "1"], d / "server.log")
    yield server
    server.stop()
