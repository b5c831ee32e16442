#!/usr/bin/env bash
# The README's first command: from a machine with nothing but Python, make a venv, install
# torch and the build tools, compile loraport against that torch, then run the bundled example.
# Which torch: where an NVIDIA GPU answers `nvidia-smi`, the CUDA 13 build (torch==2.14.1 from
# PyPI, +cu130), and loraport is compiled with CUDA: with its own kernels when nvcc is on the
# PATH or at /usr/local/cuda, else through ATen (the CUDA runtime headers torch's wheels lack
# are installed from the matching cuda-toolkit[crt,cccl]); elsewhere the CPU build (2.13.0).
#   LORAPORT_VENV   where the venv goes (default .venv)
#   LORAPORT_TORCH  the torch requirement, overriding that choice (e.g. torch==2.14.1 on a
#                   machine without a GPU, to compile the CUDA build there)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LORAPORT_VENV:-.venv}
if nvidia-smi -L >/dev/null 2>&1; then
  echo "== NVIDIA GPU found: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
  torch_spec=${LORAPORT_TORCH:-torch==2.14.1}
else
  torch_spec=${LORAPORT_TORCH:-torch==2.13.0}
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "== installing $torch_spec and the build tools into $venv"
"$venv/bin/pip" install -q "$torch_spec" numpy "scikit-build-core>=0.10" "cmake>=3.26" ninja
if "$venv/bin/python" -c 'import sys, torch; sys.exit(not torch.version.cuda)' &&
    ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  toolkit=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("cuda-toolkit"))' 2>/dev/null || true)
  if [ -n "$toolkit" ]; then
    echo "== no nvcc: the CUDA runtime headers (cuda-toolkit[crt,cccl]==$toolkit) for the build through ATen"
    "$venv/bin/pip" install -q "cuda-toolkit[crt,cccl]==$toolkit"
  fi
fi
echo "== building loraport against $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
# --no-build-isolation: compile against the torch installed above, not a fresh download. The
# extras (pyproject.toml) bring what the tests and the benchmarks need.
"$venv/bin/pip" install -q --no-build-isolation ".[test,bench]"
"$venv/bin/python" -c 'import loraport; print("loraport", loraport.__version__, "built:", loraport.BUILD_INFO)'
echo "== the main job on the bundled example: port a tiny Hunyuan-Video-shaped LoRA"
"$venv/bin/python" examples/make_tiny_example.py examples/out
"$venv/bin/loraport" port examples/out/lora.safetensors --source examples/out/source.safetensors \
    --target examples/out/target.safetensors -o examples/out/ported.safetensors \
    --report examples/out/report.json
"$venv/bin/loraport" inspect examples/out/ported.safetensors
