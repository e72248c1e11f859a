"""The int8 CPU backend: the same packed encoder with int8 linear layers.

Linear layers become :class:`Int8Linear`: weights int8 with one scale per output channel, built
from the fp32 checkpoint at load time (about a second for a small model, so nothing is cached on
disk); activations quantized to 8 bits per call over their own range (dynamic quantization),
int32 accumulation. Which kernel, which layers and which float type for the rest is an
:class:`Int8Plan`, chosen per CPU by measurement (BENCHMARKS.md, "CPU kernels"):

- CPUs with AMX (Sapphire Rapids and later): oneDNN's AMX int8 GEMM for the QKV, attention-output
  and first feed-forward layers, everything else in bf16 on AMX. The second feed-forward layer
  stays bf16: quantizing its 4x wider input costs more than its int8 GEMM saves, and its input
  (GELU outputs) carries the outlier channels that hurt int8 accuracy most.
- Other x86 CPUs (AVX2 / AVX-512 VNNI): fbgemm's dynamic int8 GEMM for the same three linears,
  each input smoothed per channel first (SmoothQuant, alpha 0.5, ranges calibrated on
  :data:`PROBE_TEXTS` at load time), the rest in fp32. The second feed-forward layer stays fp32:
  without VNNI fbgemm needs 7-bit activations, and its outlier-heavy input then drops the worst
  probe cosine to 0.971 (0.993 with VNNI; SciFact-subset nDCG@10 -1.6 points); the three smoothed
  layers give 0.999 on either CPU kind at ~95% of the four-layer speed (AMD EPYC AVX2, 2026-12).

Quality guard: the engine embeds :data:`PROBE_TEXTS` with the fp32 and the int8 model and refuses
the int8 model (:class:`Int8QualityError`) when any per-text cosine falls below ``MIN_COSINE``.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import ACTIVATIONS, NO_POST_OP, Linear

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


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def amx_supported() -> bool:
    """Whether the CPU has AMX int8 + bf16 tiles and this PyTorch build has oneDNN's int8 linear."""
    try:
        return ({"amx_int8", "amx_bf16"} <= _cpu_flags() and hasattr(torch.ops.onednn, "qlinear_pointwise")
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - builds without oneDNN
        return False


def native_bf16_supported() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX); elsewhere oneDNN emulates
    bf16 GEMMs, several times slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


# Without VNNI, fbgemm multiplies u8 x s8 pairs into saturating int16: activations must then use
# 7 bits (reduce_range) to stay exact. With VNNI the accumulation is int32 and 8 bits are safe.
_REDUCE_RANGE = not ({"avx512_vnni", "avx_vnni"} & _cpu_flags())

SMOOTH_ALPHA = 0.5
KERNELS = ("onednn", "fbgemm")
# Below this many rows (tokens in a batch) the oneDNN kernel hands the call to fbgemm (measured tie).
ONEDNN_MIN_ROWS = 64


@dataclass(frozen=True)
class Int8Plan:
    """How to build the int8 model on this CPU.

    kernel: "onednn" (AMX) or "fbgemm"; dtype: the float type of everything that is not an int8
    linear; layers: attribute names of the linears made int8; smoothed: those whose input gets
    SmoothQuant-style per-channel scaling (GELU outputs have a few outlier channels, up to ~80x the
    median on multilingual-e5-small, that would otherwise take most of the 8-bit range).
    """

    kernel: str
    dtype: torch.dtype
    layers: tuple[str, ...]
    smoothed: tuple[str, ...] = ()


def int8_plan(kernel: str | None = None) -> Int8Plan:
    """The measured-best plan for this CPU (see the module docstring). ``kernel``, or else the
    ``E5KIT_INT8_KERNEL`` environment variable, forces one ("onednn" needs AMX)."""
    kernel = kernel or os.environ.get("E5KIT_INT8_KERNEL") or ("onednn" if amx_supported() else "fbgemm")
    if kernel == "onednn" and not amx_supported():
        raise ValueError("the onednn int8 kernel needs a CPU with AMX int8/bf16 and a PyTorch build with oneDNN")
    if kernel == "onednn":
        return Int8Plan("onednn", torch.bfloat16, ("qkv", "attn_out", "fc1"))
    if kernel == "fbgemm":
        layers = ("qkv", "attn_out", "fc1")
        return Int8Plan("fbgemm", torch.float32, layers, smoothed=layers)
    raise ValueError(f"int8 kernel must be one of {KERNELS}, not {kernel!r}")


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with W in int8 (one scale per output channel) and x quantized to uint8 at
    each call over its own range (dynamic quantization).

    ``kernel="fbgemm"``: ``quantized::linear_dynamic``. ``kernel="onednn"``:
    ``onednn::qlinear_pointwise`` (AMX), fbgemm for calls under :data:`ONEDNN_MIN_ROWS` rows. Output in
    the input's dtype (fp32 or bf16), with the source :class:`~e5kit.encoder.Linear`'s activation
    applied (fused into the oneDNN GEMM).
    ``input_max`` (per input channel, from calibration) turns on smoothing: x / s and W * s with
    ``s = input_max**alpha / weight_max**(1 - alpha)``, which moves outliers from x into W.
    """

    def __init__(self, linear: nn.Linear, input_max: torch.Tensor | None = None, alpha: float = SMOOTH_ALPHA,
                 kernel: str = "fbgemm"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {KERNELS}, not {kernel!r}")
        self.kernel = kernel
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.activation = linear.activation if isinstance(linear, Linear) else None
        self.act = ACTIVATIONS[self.activation] if self.activation else None
        w = linear.weight.detach().float()
        self.inv_smooth: torch.Tensor | None = None
        if input_max is not None:
            s = input_max.float().clamp_min(1e-5) ** alpha / w.abs().amax(0).clamp_min(1e-5) ** (1 - alpha)
            s = s.clamp_min(1e-5)
            w = w * s[None, :]
            self.inv_smooth = 1.0 / s
        scales = (w.abs().amax(1) / 127.0).clamp_min(1e-12)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        # Plain attributes, not buffers: ``Module.to(dtype)`` must leave the quantized data alone.
        with warnings.catch_warnings():  # torch.ao's deprecation notices
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scales.double(), torch.zeros(self.out_features, dtype=torch.long), 0,
                                            torch.qint8)
        # fbgemm serves every call of the fbgemm kernel, and the few-row calls of the oneDNN one: for a
        # short query oneDNN's per-call overhead costs more than its AMX GEMM saves (BENCHMARKS.md).
        self._fbgemm = torch.ops.quantized.linear_prepack(qw, bias)
        if kernel == "onednn":
            self._onednn = torch.ops.onednn.qlinear_prepack(qw.int_repr(), None)
            self._w_scales = scales.float()
            self._w_zero_points = torch.zeros(self.out_features, dtype=torch.int32)
            self._bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inv_smooth is not None:
            x = x * self.inv_smooth.to(x.dtype)
        if self.kernel == "fbgemm" or x.shape[0] < ONEDNN_MIN_ROWS:
            y = torch.ops.quantized.linear_dynamic(x.float(), self._fbgemm, _REDUCE_RANGE)
            return (self.act.fn(y) if self.act else y).to(x.dtype)
        qx, scale, zero_point = _quantize_uint8(x)
        attr, algorithm = self.act.post_op if self.act else NO_POST_OP
        return torch.ops.onednn.qlinear_pointwise(qx, scale, zero_point, self._onednn, self._w_scales,
                                                  self._w_zero_points, self._bias, 1.0, 0, x.dtype, attr, [],
                                                  algorithm)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}, "
                f"smoothed={self.inv_smooth is not None}"
                + (f", activation={self.activation}" if self.activation else ""))


def _quantize_uint8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """x as uint8 over its own range (which always includes 0): (q, scale, zero_point)."""
    lo, hi = torch.aminmax(x)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero_point = min(255, max(0, round(-lo / scale)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(x.float().contiguous(), scale, zero_point, torch.quint8)
    # The quantized tensor's bytes, viewed as plain uint8 without a copy (int_repr() copies).
    return torch.empty(0, dtype=torch.uint8).set_(q.untyped_storage(), 0, q.shape, q.stride()), scale, zero_point


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


def quantize_linears(model: nn.Module, calibrate: Callable[[nn.Module], object] | None = None,
                     plan: Int8Plan | None = None) -> nn.Module:
    """A copy of ``model`` built by ``plan`` (default: :func:`int8_plan` for this CPU): the plan's
    linears become :class:`Int8Linear`, everything else is cast to ``plan.dtype``; ``model`` itself
    is left untouched. ``calibrate(model)`` (e.g. embedding :data:`PROBE_TEXTS`) supplies the input
    ranges for the smoothed layers; without it nothing is smoothed."""
    if not int8_supported():
        raise RuntimeError("this PyTorch build has no fbgemm quantized CPU kernels; use backend='torch'")
    plan = plan or int8_plan()
    maxima = input_maxima(model, plan.smoothed, calibrate) if calibrate is not None else {}
    targets = {full: mod for full, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and full.rsplit(".", 1)[-1] in plan.layers}
    # Share every tensor that keeps its dtype with ``model`` (the embedding table alone is ~400 MB for
    # multilingual models) and the linears about to be replaced; cast the others into new tensors.
    replaced = {id(p) for mod in targets.values() for p in mod.parameters()}
    memo: dict[int, object] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in replaced or not t.is_floating_point() or t.dtype == plan.dtype:
            memo[id(t)] = t
        else:
            cast = t.detach().to(plan.dtype)
            memo[id(t)] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast
    out = copy.deepcopy(model, memo)
    for full, linear in targets.items():
        parent, _, child = full.rpartition(".")
        setattr(out.get_submodule(parent), child, Int8Linear(linear, maxima.get(full), kernel=plan.kernel))
    return out.eval()


def build_int8(model: nn.Module, embed: Callable[[nn.Module], torch.Tensor],
               plan: Int8Plan | None = None) -> tuple[nn.Module, float]:
    """The int8 model for ``model`` (:func:`quantize_linears`; ``model`` is left untouched) and its
    worst per-text cosine to ``model``. ``embed(m)`` embeds fixed texts (:data:`PROBE_TEXTS`) with
    model ``m``: one pass of ``model`` both calibrates the smoothed layers and gives the reference."""
    ref: list[torch.Tensor] = []
    int8 = quantize_linears(model, calibrate=lambda m: ref.append(embed(m)), plan=plan)
    return int8, float(F.cosine_similarity(ref[0], embed(int8), dim=-1).min())


__all__ = ["MIN_COSINE", "PROBE_TEXTS", "Int8QualityError", "Int8Linear", "Int8Plan", "amx_supported", "build_int8",
           "int8_plan", "int8_supported", "input_maxima", "native_bf16_supported", "quantize_linears"]
