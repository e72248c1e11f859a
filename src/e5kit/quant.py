"""The int8 CPU backend: the same packed encoder with int8 linear layers.

Every ``nn.Linear`` of the encoder (fused QKV, attention output, both feed-forward layers: all the
weight FLOPs) becomes an :class:`Int8Linear` on fbgemm's dynamic int8 GEMM: weights int8 with one
scale per output channel, built from the fp32 checkpoint at load time (about a second for a small
model, so nothing is cached on disk); activations quantized to 8 bits per call over their own
range, accumulation in int32 (VNNI / AVX-512). The second feed-forward layer's input is smoothed
per channel first (SmoothQuant, alpha 0.5, ranges calibrated on :data:`PROBE_TEXTS` at load time).
Embeddings, layer norms, attention and pooling stay fp32. BENCHMARKS.md ("Speed") has the
measurements behind these choices.

Quality guard: the engine embeds :data:`PROBE_TEXTS` with the fp32 and the int8 model and refuses
the int8 model (:class:`Int8QualityError`) when any per-text cosine falls below ``MIN_COSINE``.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

MIN_COSINE = 0.99

# Mixed lengths, scripts and content: short queries, a long passage, numbers, non-Latin text.
PROBE_TEXTS = (
    "query: how much protein should a female eat",
    "query: summit define",
    "passage: As a general guideline, the CDC's average requirement of protein for women ages 19 to 70 "
    "is 46 grams per day. But, as you can see from this chart, you'll need to increase that if you're "
    "expecting or training for a marathon.",
    "passage: Definition of summit for English Language Learners. : 1 the highest point of a mountain : "
    "the top of a mountain. : 2 the highest level. : 3 a meeting or series of meetings between the "
    "leaders of two or more governments.",
    "passage: Alterations of the architecture of cerebral white matter in the developing human brain can "
    "affect cortical development and result in functional disabilities. A line scan diffusion-weighted "
    "magnetic resonance imaging (MRI) sequence with diffusion tensor analysis was applied to measure "
    "the apparent diffusion coefficient in 17 preterm infants at 28 and 40 weeks.",
    "query: 南瓜的家常做法",
    "passage: 1. 清炒南瓜丝 原料:嫩南瓜半个 调料:葱、盐、白糖、鸡精 做法: 1、南瓜用刀薄薄的削去表面一层皮,用勺子刮去瓤",
    "query: Wie viele Einwohner hat Berlin? 3,7 Millionen (2023)",
    "passage: " + " ".join(["the cell study of gene and cancer risk in patients"] * 60),
)


class Int8QualityError(ValueError):
    """The int8 model strays too far from fp32 on the probe texts for this checkpoint."""


def int8_supported() -> bool:
    """Whether this PyTorch build has fbgemm's quantized CPU kernels."""
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def _has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16: activations must then use
# 7 bits (reduce_range) to stay exact. With VNNI the accumulation is int32 and 8 bits are safe.
_REDUCE_RANGE = not _has_vnni()

# Layers whose input gets SmoothQuant-style per-channel scaling before quantization: the second
# feed-forward layer reads GELU outputs, whose few outlier channels (up to ~80x the median on
# multilingual-e5-small) would otherwise take most of the 8-bit range. Measured in BENCHMARKS.md.
SMOOTHED = ("fc2",)
SMOOTH_ALPHA = 0.5


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W in int8 (one scale per output channel) and x quantized to uint8 at
    each call over its own range (dynamic quantization), through fbgemm's ``linear_dynamic``.

    ``input_max`` (per input channel, from calibration) turns on smoothing: x / s and W * s with
    ``s = input_max**alpha / weight_max**(1 - alpha)``, which moves outliers from x into W.
    """

    def __init__(self, linear: nn.Linear, input_max: torch.Tensor | None = None, alpha: float = SMOOTH_ALPHA):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        self.inv_smooth: torch.Tensor | None = None
        if input_max is not None:
            s = input_max.float().clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
            s = s.clamp_min(1e-5)
            w = w * s[None, :]
            self.inv_smooth = 1.0 / s
        scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # torch.ao's deprecation notices
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scales, torch.zeros_like(scales, dtype=torch.long), 0, torch.qint8)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self._packed = torch.ops.quantized.linear_prepack(qw, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth
        return torch.ops.quantized.linear_dynamic(x, self._packed, _REDUCE_RANGE)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, smoothed={self.inv_smooth is not None}"


def input_maxima(model: nn.Module, names: Sequence[str], run: Callable[[nn.Module], object]) -> dict[str, torch.Tensor]:
    """Per-channel max |input| of every linear whose attribute name is in ``names``, over ``run(model)``."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_module, inputs):
            m = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0).float()
            seen[name] = torch.maximum(seen[name], m) if name in seen else m
        return record

    handles = [mod.register_forward_pre_hook(hook(n)) for n, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and n.rsplit(".", 1)[-1] in names]
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    return seen


def quantize_linears(model: nn.Module, calibrate: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by :class:`Int8Linear`; ``model`` itself is
    left untouched. ``calibrate(model)`` (e.g. embedding :data:`PROBE_TEXTS`) supplies the input
    ranges for the smoothed layers; without it nothing is smoothed."""
    if not int8_supported():
        raise RuntimeError("this PyTorch build has no fbgemm quantized CPU kernels; use backend='torch'")
    maxima = input_maxima(model, SMOOTHED, calibrate) if calibrate is not None else {}
    # Share every tensor with ``model`` (the embedding table alone is ~400 MB for multilingual
    # models); the linears' fp32 weights are then dropped from the copy.
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)
    for name, mod in list(out.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{name}.{child_name}" if name else child_name
                setattr(mod, child_name, Int8Linear(child, maxima.get(full)))
    return out.eval()


__all__ = ["MIN_COSINE", "PROBE_TEXTS", "Int8QualityError", "Int8Linear", "int8_supported", "input_maxima",
           "quantize_linears"]
