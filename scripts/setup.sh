#!/usr/bin/env bash
# Installs everything my_mps_ops needs on a fresh Linux or macOS machine, then
# builds the extension in editable mode. Idempotent: re-running skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

# System packages (Linux): Boost.Context for the Metal emulator's fibers,
# clang for the Objective-C++ compile check, cmake for the LibTorch consumer
# example (test/integration/test_cpp_consumer.py).
if [ "$(uname -s)" = "Linux" ] && command -v apt-get >/dev/null 2>&1; then
  missing=()
  dpkg -s libboost-context-dev >/dev/null 2>&1 || missing+=(libboost-context-dev)
  command -v clang++ >/dev/null 2>&1 || missing+=(clang)
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
  fi
fi

# torch first, by exact version, so nothing below pulls another build.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q "torch==${TORCH_VERSION}"
fi
"$PYTHON" -m pip install -q ninja pytest expecttest hypothesis tqdm matplotlib transformers
# The reference implementations the quantization tests compare with: MLX's
# affine format and bitsandbytes' NF4/FP4 (both have CPU builds on PyPI).
"$PYTHON" -m pip install -q "mlx[cpu]==0.32.4" "bitsandbytes==0.50.2"
# PEFT, whose LoRA layers my_mps_ops.lora puts on quantized linear layers.
"$PYTHON" -m pip install -q "peft==0.21.0"

# The extension itself, against the torch above.
MAX_JOBS=${MAX_JOBS:-2} "$PYTHON" -m pip install -q --no-build-isolation -e .
