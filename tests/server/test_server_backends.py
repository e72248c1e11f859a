"""`e5kit serve --backend int8` and `--dtype bfloat16`: real servers, the openai client, results
against the library in the same configuration and against fp32."""

from __future__ import annotations

import httpx
import numpy as np
import openai
import pytest

from server_helpers import ServerProcess
from e5kit import E5

TEXTS = ["how much protein should a female eat", "summit define", "南瓜的家常做法",
         "passage: the cell study of gene and cancer risk in patients " * 8]


@pytest.mark.parametrize("args, kwargs, min_cos, logged", [
    (["--backend", "int8"], {"backend": "int8"}, 0.99, "backend int8 (int8 linear layers, the rest "),
    (["--dtype", "bfloat16"], {"dtype": "bfloat16"}, 0.999, "backend torch, dtype bfloat16"),
])
def test_served_backend_matches_library(tiny_xlmr, tmp_path, args, kwargs, min_cos, logged):
    lib = E5(str(tiny_xlmr), **kwargs)
    fp32 = E5(str(tiny_xlmr)).encode_queries(TEXTS)
    server = ServerProcess(["-m", f"x={tiny_xlmr}", *args], tmp_path / "server.log")
    try:
        # The startup log names what runs (issue 18: --backend int8 was logged as "dtype bfloat16").
        line = next(x for x in server.log().splitlines() if "model x:" in x)
        assert logged in line and (kwargs.get("backend") != "int8" or "dtype" not in line), line
        card = httpx.get(server.url + "/v1/models").json()["data"][0]
        assert card["backend"] == lib.backend and card["dtype"] == str(lib.dtype).replace("torch.", "")
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        resp = c.embeddings.create(input=TEXTS, model="x", encoding_format="float")
        got = np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)
    finally:
        server.stop()
    # One request forms one batch, as the library call does: the same computation.
    np.testing.assert_allclose(got, lib.encode_queries(TEXTS), atol=1e-5)
    assert (got * fp32).sum(1).min() >= min_cos
    assert not np.array_equal(got, fp32)
