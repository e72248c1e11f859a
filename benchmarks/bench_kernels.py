"""Per-call time of one linear layer through each CPU kernel e5kit can use, on e5-small-v2's shapes:
the measurements behind the int8 plans in ``e5kit.quant`` and the packed oneDNN linears.

    flock /tmp/e5kit-cpu.lock python benchmarks/bench_kernels.py

Columns: F.linear fp32; oneDNN fp32 and bf16 with the weight packed once (``PackedLinear``); int8
through fbgemm (fp32 in, dynamic activation quantization included) and through oneDNN's AMX kernel
(bf16 in, quantization included; ``Int8Linear(kernel="onednn")`` without its small-call fbgemm route).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from e5kit.encoder import PackedLinear  # noqa: E402
from e5kit.quant import Int8Linear, _quantize_uint8, amx_supported  # noqa: E402


def per_call_us(f, min_s: float = 0.3) -> float:
    for _ in range(5):
        f()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s:
        f()
        n += 1
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    amx = amx_supported()
    print(f"threads {torch.get_num_threads()}, AMX {'yes' if amx else 'no'}; microseconds per call")
    print(f"{'rows':>5} {'layer':>10} {'fp32':>8} {'fp32 pk':>8} {'bf16 pk':>8} {'i8 fbgemm':>10} {'i8 onednn':>10}")
    torch.manual_seed(0)
    for rows in (16, 64, 512, 2048, 4096):
        for name, (k, n) in {"qkv": (384, 1152), "attn_out": (384, 384), "fc1": (384, 1536),
                             "fc2": (1536, 384)}.items():
            lin = nn.Linear(k, n)
            x = torch.randn(rows, k)
            xb = x.bfloat16()
            pk32, pk16 = PackedLinear(lin), PackedLinear(nn.Linear(k, n).bfloat16())
            fb = Int8Linear(lin, kernel="fbgemm")
            cols = [per_call_us(lambda: lin(x)), per_call_us(lambda: pk32(x)), per_call_us(lambda: pk16(xb)),
                    per_call_us(lambda: fb(x))]
            if amx:
                od = Int8Linear(lin, kernel="onednn")
                od_fn = lambda: torch.ops.onednn.qlinear_pointwise(  # noqa: E731 - the AMX route only
                    *_quantize_uint8(xb), od._onednn, od._w_scales, od._w_zero_points, od._bias, 1.0, 0, torch.bfloat16,
                    "none", [], "")
                cols.append(per_call_us(od_fn))
            print(f"{rows:5d} {name:>10} " + " ".join(f"{c:8.0f}" if i < 3 else f"{c:10.0f}" for i, c in enumerate(cols)),
                  flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
