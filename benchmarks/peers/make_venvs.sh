#!/usr/bin/env bash
# The peer virtualenvs of benchmarks/bench_peers.py (docs/speed.md, "Peers"): OpenVINO through
# optimum-intel, and sentence-transformers' ONNX backend (ONNX Runtime). Their pins conflict with
# e5kit's test extra and with each other's, so each gets its own venv. Usage:
#   bash benchmarks/peers/make_venvs.sh [DIR]      # default /work/venv-peers
set -euo pipefail
dir=${1:-/work/venv-peers}
here=$(cd "$(dirname "$0")" && pwd)
for name in openvino onnx; do
    python3 -m venv "$dir/$name"
    "$dir/$name/bin/pip" install -q --upgrade pip
    # the CPU build of torch first (a bare `torch` can pull a multi-GB CUDA build)
    "$dir/$name/bin/pip" install -q torch==2.13.0 || "$dir/$name/bin/pip" install -q torch --index-url https://download.pytorch.org/whl/cpu
    "$dir/$name/bin/pip" install -q -r "$here/requirements-$name.txt"
    "$dir/$name/bin/pip" uninstall -y -q torchvision 2>/dev/null || true  # a CUDA torchvision breaks imports beside CPU torch
done
echo "peers ready: E5KIT_OPENVINO_PYTHON=$dir/openvino/bin/python E5KIT_ST_ONNX_PYTHON=$dir/onnx/bin/python"
