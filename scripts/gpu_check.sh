#!/usr/bin/env bash
# The GPU checks for a machine with a CUDA GPU, nvcc and torch already installed
# (the lent H100/H200 of the workplace's device tool, 16 cores), sized for a 15-minute lease:
#   1. four builds at once, each in build/gpu-<name> with its own copy of the package:
#        default   the default architectures (every one of torch's + sm_89, PTX for the newest)
#        ptx       sm_80 SASS + compute_80 PTX only: a newer GPU runs our kernels from the PTX
#        fallback  SASS for another GPU family only (sm_80, or sm_90 on an sm_80 GPU), no PTX:
#                  this GPU has no image, the ops take ATen's kernels with one warning
#        no-nvcc   LORAPORT_NVCC=OFF: the ops through ATen, no kernels of ours (needs the CUDA
#                  runtime headers torch's wheels lack: installed from .devbuild/wheels, which
#                  --prebuild fills, when the machine has none)
#   2. the default build: every CUDA test with LORAPORT_CUSOLVER_EIGH=require (cuSOLVER's
#      batched eigensolver must serve every Rayleigh-Ritz step it takes), the profile of one
#      rsvd call, the rsvd benchmark, and the quarter-size streaming port (peak VRAM, peak host
#      RSS under --max-vram 2GB);
#   3. the CUDA tests of the build, op and port files for ptx, fallback and no-nvcc, also with
#      LORAPORT_CUSOLVER_EIGH=require (run before the profile, in the "tests" part).
# Logs go to $OUT (default ./gpu-out; at most 8 files come back from the device tool):
# build.log, tests.log, profile.log, bench.log, rsvd_cuda.md, port_stream.log.
# Stage budgets (seconds): TESTS_S (default build), VARIANT_TESTS_S (each other build),
# PROFILE_S, BENCH_S, PORT_S (PORT_S=0 skips the port).
#
# The device tool's runs last at most 600 s each, so the lease takes two calls (the builds stay
# in build/ between calls on a warm machine; "perf" rebuilds the default one if it is gone):
#   bash scripts/gpu_check.sh tests     # 1: the four builds and their CUDA tests (~7 min)
#   bash scripts/gpu_check.sh perf      # 2: profile, benchmark, quarter-size port (~7 min)
#   bash scripts/gpu_check.sh           # both, on a machine without that limit
#   bash scripts/gpu_check.sh --prebuild PYTHON     # here, first: fetch the CUDA header wheels
#                                                   # into .devbuild/wheels (untracked: it travels)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prebuild" ]; then
  py=${2:?usage: --prebuild PYTHON (a venv with the CUDA torch)}
  toolkit=$("$py" -c 'import importlib.metadata as m; print(m.version("cuda-toolkit"))') || exit 1
  mkdir -p .devbuild/wheels
  "$(dirname "$py")/pip" download -q --no-deps -d .devbuild/wheels \
      $("$py" - "$toolkit" <<'PY'
import importlib.metadata as m, re, sys
# the exact crt and cccl wheels cuda-toolkit==<version> pins for its [crt,cccl] extras
pins = [r for r in m.requires("cuda-toolkit") if re.search(r"extra == .(crt|cccl).", r)]
print(" ".join(re.match(r"[^;]+", r).group().replace(" ", "").replace(".*", "") for r in pins))
PY
) && ls .devbuild/wheels
  exit
fi

OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=$(command -v python3)
start=$SECONDS
stage() { echo "== [$((SECONDS - start)) s] $*"; }

stage "machine"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
gpu_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
other_arch=80
[ "${gpu_arch:0:1}" = 8 ] && other_arch=90  # SASS of another major version never runs here
nvidia_include=$($py -c "import nvidia, os, torch; print(os.path.join(list(nvidia.__path__)[0], 'cu' + torch.version.cuda.split('.')[0], 'include'))")
if [ ! -f "$nvidia_include/crt/host_defines.h" ] && ls .devbuild/wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps .devbuild/wheels/*.whl && echo "installed the CUDA header wheels from .devbuild/wheels"
fi

build() {  # build NAME CMAKE-ARGS...: build/gpu-NAME/pkg/loraport with its own _C.so
  local name=$1 dir=build/gpu-$1
  shift
  { cmake -S . -B "$dir" -G Ninja -DPython_EXECUTABLE="$py" -DLORAPORT_CUDA=ON -DCMAKE_BUILD_TYPE=Release "$@" &&
      cmake --build "$dir" -j4; } >"$dir.log" 2>&1 || { echo "BUILD FAILED: $name"; return 1; }
  rm -rf "$dir/pkg" && mkdir -p "$dir/pkg" && cp -r python/loraport "$dir/pkg/" && cp "$dir/_C.so" "$dir/pkg/loraport/_C.so"
}
mkdir -p build
part=${1:-all}
if [ "$part" != perf ]; then
  stage "four builds at once (logs: build.log); this GPU is sm_$gpu_arch, the fallback build holds sm_$other_arch only"
  t0=$SECONDS
  LORAPORT_CUDA_ARCHS= build default -DCMAKE_CUDA_FLAGS=--threads=0 & pids=($!)
  LORAPORT_CUDA_ARCHS=80 build ptx & pids+=($!)
  LORAPORT_CUDA_ARCHS=$other_arch-real build fallback & pids+=($!)
  build no-nvcc -DLORAPORT_NVCC=OFF & pids+=($!)
  names=(default ptx fallback no-nvcc)
  for i in 0 1 2 3; do wait "${pids[$i]}"; echo "${names[$i]} build: exit code $?, done by $((SECONDS - t0)) s"; done
  cat build/gpu-*.log >"$OUT/build.log" 2>/dev/null
  grep "loraport:" "$OUT/build.log"
elif [ ! -f build/gpu-default/pkg/loraport/_C.so ]; then
  stage "default build (none from an earlier call)"
  LORAPORT_CUDA_ARCHS= build default -DCMAKE_CUDA_FLAGS=--threads=0
fi

with() {  # with NAME COMMAND...: run COMMAND against build NAME
  PYTHONPATH=$PWD/build/gpu-$1/pkg LORAPORT_CUSOLVER_EIGH=require "${@:2}"
}
cuda_tests() {  # cuda_tests NAME SECONDS [FILES...]
  local name=$1 seconds=$2
  shift 2
  [ -f "build/gpu-$name/pkg/loraport/_C.so" ] || { echo "---- $name: no build"; return; }
  echo "---- $name: $(with "$name" $py -c 'import loraport; print(loraport.BUILD_INFO)' 2>&1 | tail -1)"
  with "$name" timeout "$seconds" $py -m pytest -q -m cuda -p no:cacheprovider "${@:-tests}" >"$OUT/tests-now.log" 2>&1
  echo "pytest exit code $? (124: ran out of its $seconds s)"
  grep -E "passed|failed|error|^(FAILED|ERROR)|loraport: this build" "$OUT/tests-now.log" | head -20
  cat "$OUT/tests-now.log" >>"$OUT/tests.log" && rm "$OUT/tests-now.log"
}

if [ "$part" != perf ]; then
  stage "default build: CUDA tests, LORAPORT_CUSOLVER_EIGH=require"
  cuda_tests default "${TESTS_S:-150}"
  for name in ptx fallback no-nvcc; do
    stage "$name build: CUDA tests of the build, op and port files"
    cuda_tests "$name" "${VARIANT_TESTS_S:-60}" tests/test_build.py tests/test_ops.py tests/test_port.py
  done
fi
[ "$part" = tests ] && { stage "done"; exit; }

stage "default build: host syncs and profile of one rsvd call"
with default timeout "${PROFILE_S:-90}" $py benchmarks/gpu_profile.py >"$OUT/profile.log" 2>&1
echo "exit code $?"; tail -45 "$OUT/profile.log"

stage "default build: rsvd benchmark"
with default timeout "${BENCH_S:-150}" $py -m benchmarks.rsvd --device cuda ${BENCH_ARGS:---ranks 64 --batch 4 --repeats 10} \
    --markdown "$OUT/rsvd_cuda.md" >"$OUT/bench.log" 2>&1
echo "exit code $?"
grep -E "^(## |ceilings|### )|^\| loraport (power|krylov) \||^\| torch" "$OUT/bench.log" | cut -c1-200
tail -3 "$OUT/bench.log"

if [ "${PORT_S:-150}" != 0 ]; then
  stage "default build: quarter-size streaming port (5 double + 10 single blocks), --max-vram 2GB"
  with default timeout "${PORT_S:-150}" $py -m benchmarks.port_stream --blocks-double 5 --blocks-single 10 \
      --dir /tmp/port_stream --device cuda --max-vram 2GB >"$OUT/port_stream.log" 2>&1
  echo "exit code $?"; grep -E "^\|" "$OUT/port_stream.log" | cut -c1-220
fi
stage "done"
