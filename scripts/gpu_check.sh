#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA GPU and torch already installed (the
# lent H100/H200 of the workplace's device tool): (1) loraport in place, either a _C.so built
# elsewhere against this very torch (put in .devbuild/_C.so, e.g. by scripts/gpu_check.sh
# --prebuild on a machine with nvcc) or a build here; (2) the CUDA tests; (3) host syncs and a
# profile of one rsvd call; (4) the rsvd benchmark on the GPU. Logs and tables go to $OUT
# (default ./gpu-out). Stage budgets (seconds): TESTS_S, PROFILE_S, BENCH_S.
#
#   bash scripts/gpu_check.sh                       # on the GPU machine
#   bash scripts/gpu_check.sh --prebuild PYTHON     # here: build .devbuild/_C.so against PYTHON's torch
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prebuild" ]; then
  py=${2:?usage: --prebuild PYTHON}
  bin=$(dirname "$py")
  "$bin/cmake" -S . -B build/devbuild -G Ninja -DPython_EXECUTABLE="$py" -DLORAPORT_CUDA=ON \
      -DCMAKE_MAKE_PROGRAM="$bin/ninja" -DCMAKE_BUILD_TYPE=Release >/dev/null &&
    "$bin/cmake" --build build/devbuild && mkdir -p .devbuild && cp build/devbuild/_C.so .devbuild/_C.so &&
    echo "built .devbuild/_C.so against $("$py" -c 'import torch; print(torch.__version__)')"
  exit
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/python
py=python3
start=$SECONDS
stage() { echo "== [$((SECONDS - start)) s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm --format=csv
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"

stage "loraport in place"
[ -f .devbuild/_C.so ] && cp .devbuild/_C.so python/loraport/_C.so
if ! $py -c "import loraport, torch; assert loraport.cuda_built() and loraport.BUILD_INFO['torch'] == torch.__version__; print('carried build', loraport.BUILD_INFO)"; then
  stage "building here"
  cmake -S . -B build/dev -G Ninja -DPython_EXECUTABLE="$(command -v $py)" -DLORAPORT_CUDA=ON \
      -DCMAKE_BUILD_TYPE=Release >"$OUT/cmake.log" 2>&1 && cmake --build build/dev -j"$(nproc)" >>"$OUT/cmake.log" 2>&1 ||
    { tail -30 "$OUT/cmake.log"; exit 1; }
  cp build/dev/_C.so python/loraport/_C.so
  $py -c "import loraport; print('built here', loraport.BUILD_INFO)" || exit 1
fi

stage "CUDA tests"
timeout "${TESTS_S:-150}" $py -m pytest -q -m cuda tests -p no:cacheprovider -W ignore::UserWarning >"$OUT/pytest_cuda.log" 2>&1
echo "pytest exit code $?"
grep -E "passed|failed|error" "$OUT/pytest_cuda.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/pytest_cuda.log" | head -20

stage "host syncs and profile of one rsvd call"
timeout "${PROFILE_S:-150}" $py benchmarks/gpu_profile.py >"$OUT/profile.log" 2>&1
echo "exit code $?"; tail -45 "$OUT/profile.log"

stage "rsvd benchmark"
timeout "${BENCH_S:-180}" $py -m benchmarks.rsvd --device cuda ${BENCH_ARGS:---ranks 64 --batch 4 --repeats 10} \
    --markdown "$OUT/rsvd_cuda.md" >"$OUT/bench.log" 2>&1
echo "exit code $?"
grep -E "^(## |ceilings|### )|^\| loraport (power|krylov) \||^\| torch" "$OUT/bench.log" | cut -c1-200
tail -3 "$OUT/bench.log"
stage "done"
