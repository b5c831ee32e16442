#!/usr/bin/env bash
# The README's first command: from a machine with nothing but Python, make a venv, install
# torch and the build tools, compile loraport against that torch, then run the bundled example.
#   LORAPORT_VENV   where the venv goes (default .venv)
#   LORAPORT_TORCH  the torch requirement (default torch==2.13.0, a CPU build; e.g.
#                   LORAPORT_TORCH=torch==2.14.1 for the CUDA 13 build, with nvcc on the PATH
#                   or at /usr/local/cuda, to compile the CUDA kernels too)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LORAPORT_VENV:-.venv}
torch_spec=${LORAPORT_TORCH:-torch==2.13.0}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
echo "== installing $torch_spec and the build/test tools into $venv"
"$venv/bin/pip" install -q "$torch_spec" numpy safetensors tqdm pytest pytest-benchmark \
    "scikit-build-core>=0.10" "cmake>=3.26" ninja diffusers peft hypothesis
echo "== building loraport against $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
# --no-build-isolation: compile against the torch installed above, not a fresh download.
"$venv/bin/pip" install -q --no-build-isolation .
"$venv/bin/python" -c 'import loraport; print("loraport", loraport.__version__, "built:", loraport.BUILD_INFO)'
echo "== the main job on the bundled example: port a tiny Hunyuan-Video-shaped LoRA"
"$venv/bin/python" examples/make_tiny_example.py examples/out
"$venv/bin/loraport" port examples/out/lora.safetensors --source examples/out/source.safetensors \
    --target examples/out/target.safetensors -o examples/out/ported.safetensors \
    --report examples/out/report.json
"$venv/bin/loraport" inspect examples/out/ported.safetensors
