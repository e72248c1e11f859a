"""The CUDA path (issue 5): bf16/fp16, flash-attention varlen when installed, large token budgets.
Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import e5kit.encoder
from e5kit import E5
from helpers import PARITY_TEXTS, reference_embed

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not exercised here"),
    pytest.mark.filterwarnings("ignore::e5kit.api.TruncationWarning"),
]

TEXTS = PARITY_TEXTS + [f"passage: gene {i} " + "cell study " * (i * 5) for i in range(40)]


@pytest.mark.parametrize("kind", ["tiny_bert", "tiny_xlmr", "tiny_mlsmall"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_half_precision_close_to_reference(kind, dtype, request):
    path = request.getfixturevalue(kind)
    model = E5(str(path), device="cuda", dtype=dtype)
    assert model.device.type == "cuda" and model.backend == "torch"
    ref = reference_embed(path, TEXTS)
    out = model.encode(TEXTS)
    assert out.dtype == np.float32
    assert (out * ref).sum(1).min() >= 0.999


def test_cuda_default_dtype_is_half(tiny_bert):
    model = E5(str(tiny_bert), device="cuda")
    assert model.dtype in (torch.bfloat16, torch.float16)


def test_cuda_fp32_parity(tiny_bert):
    out = E5(str(tiny_bert), device="cuda", dtype="float32").encode(TEXTS)
    assert np.abs(out - reference_embed(tiny_bert, TEXTS)).max() <= 1e-4  # TF32-free, but CUDA reductions differ


def test_large_token_budget_matches_small_batches(tiny_bert):
    model = E5(str(tiny_bert), device="cuda", dtype="bfloat16")
    big = model.encode(TEXTS * 10, batch_size=4096, max_batch_tokens=1 << 20)
    small = model.encode(TEXTS * 10, batch_size=2, max_batch_tokens=1024)
    assert (big * small).sum(1).min() >= 0.999


@pytest.mark.skipif(e5kit.encoder.flash_attn_varlen_qkvpacked_func is None, reason="flash-attn is not installed")
def test_flash_varlen_matches_padded_sdpa(tiny_bert, monkeypatch):
    model = E5(str(tiny_bert), device="cuda", dtype="bfloat16")
    flash = model.encode(TEXTS)
    monkeypatch.setattr(e5kit.encoder, "flash_attn_varlen_qkvpacked_func", None)  # force the padded SDPA path
    padded = model.encode(TEXTS)
    assert (flash * padded).sum(1).min() >= 0.999


def test_int8_refused_on_cuda(tiny_bert):
    with pytest.raises(ValueError, match="CPU only"):
        E5(str(tiny_bert), device="cuda", backend="int8")
