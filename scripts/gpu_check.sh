#!/usr/bin/env bash
# The GPU checks for a machine with a CUDA GPU, nvcc and torch already installed (the lent H200 of
# the workplace's device tool: 16 cores, one call of at most 600 s, 15 minutes of device time in
# all, the machine's start included), so everything runs in one call that ends by DEADLINE_S
# (default 560 s; a stage that would overrun it is cut short or skipped, and says so):
#   1. four builds at once, each in build/gpu-<name> with its own copy of the package:
#        default   the default architectures (every one of torch's + sm_89, PTX for the newest)
#        ptx       sm_80 SASS + compute_80 PTX only: a newer GPU runs our kernels from the PTX
#        fallback  SASS for another GPU family only (sm_80, or sm_90 on an sm_80 GPU), no PTX:
#                  this GPU has no image, the ops take ATen's kernels with one warning
#        no-nvcc   LORAPORT_NVCC=OFF: the ops through ATen, no kernels of ours (needs the CUDA
#                  runtime headers torch's wheels lack: installed from .devbuild/wheels, which
#                  --prebuild fills, or else copied from the machine's toolkit)
#      then, in the background, the half-size model pair of benchmarks.port_stream is generated
#      into /tmp/port_stream (kept: a rerun on a warm machine reuses it, and the builds too);
#   2. the default build: every CUDA test with LORAPORT_CUSOLVER_EIGH=require (cuSOLVER's
#      batched eigensolver must serve every Rayleigh-Ritz step it takes);
#   3. the CUDA tests of the build, op and port files for ptx, fallback and no-nvcc, at the same
#      time as 2; then one rsvd call of the fallback build, under cuda-gdb if it crashes;
#   4. the half-size streaming port (10 double + 20 single blocks, the default variant,
#      --max-vram 2GB): cold floor, cold port, warm port against a read-and-sum;
#   5. with the time left: where the warm port's time goes (cProfile), the cold port again with
#      LORAPORT_DIRECT_IO=0, the rsvd benchmark, the profile of one rsvd call.
# Logs go to $OUT (default ./gpu-out; at most 8 files come back from the device tool):
# build.log, tests.log, generate.log, diagnose.log, port_stream.log, port_stream.md,
# port_profile.txt, port_buffered.log, bench.log, rsvd_cuda.md, profile.log (the tool brings back
# 8: pick with STAGES, default "tests variants diagnose port port_profile port_buffered bench
# profile", the stages after the builds); TESTS_S, VARIANT_TESTS_S, PORT_S, BENCH_S and
# PROFILE_S cap those stages (seconds).
#   bash scripts/gpu_check.sh                       # on the GPU machine
#   bash scripts/gpu_check.sh --prebuild PYTHON     # here, first, if the GPU machine may lack the
#                                                   # CUDA headers: fetch their wheels into
#                                                   # .devbuild/wheels (untracked: it travels)
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
deadline=${DEADLINE_S:-560}
stages=${STAGES:-tests variants diagnose port port_profile port_buffered bench profile}
stage() { echo "== [$((SECONDS - start)) s] $*"; }
wanted() { [[ " $stages " == *" $1 "* ]]; }
budget() {  # budget CAP: CAP seconds, or what is left before the deadline if that is less (0: skip)
  local left=$((deadline - (SECONDS - start)))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}

stage "machine"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"
nproc; free -g | head -2; df -h /tmp | tail -1
gpu_arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
other_arch=80
[ "${gpu_arch:0:1}" = 8 ] && other_arch=90  # SASS of another major version never runs here
nvidia_include=$($py -c "import nvidia, os, torch; print(os.path.join(list(nvidia.__path__)[0], 'cu' + torch.version.cuda.split('.')[0], 'include'))")
toolkit_include=/usr/local/cuda/include
if [ ! -f "$nvidia_include/crt/host_defines.h" ] && ls .devbuild/wheels/*.whl >/dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps .devbuild/wheels/*.whl && echo "installed the CUDA header wheels from .devbuild/wheels"
elif [ ! -f "$nvidia_include/crt/host_defines.h" ] && [ -f "$toolkit_include/crt/host_defines.h" ]; then
  # What cuda-toolkit[crt,cccl] would add to torch's headers (the no-nvcc build needs them),
  # taken from this machine's toolkit: crt/, and CCCL's cuda/, cub/, thrust/ and nv/.
  cp -rn "$toolkit_include/crt" "$nvidia_include/"
  # the trailing slash: a toolkit's include/ is often a link (to targets/<arch>/include)
  cccl=$(dirname "$(dirname "$(find "$toolkit_include/" -maxdepth 3 -type f -path '*/nv/target' | head -1)")")
  for d in cuda cub thrust nv; do [ -d "$cccl/$d" ] && cp -rn "$cccl/$d" "$nvidia_include/"; done
  echo "copied crt/ and CCCL's headers (from $cccl) of $toolkit_include into $nvidia_include"
fi

build() {  # build NAME CMAKE-ARGS...: build/gpu-NAME/pkg/loraport with its own _C.so
  local name=$1 dir=build/gpu-$1
  shift
  { cmake -S . -B "$dir" -G Ninja -DPython_EXECUTABLE="$py" -DLORAPORT_CUDA=ON -DCMAKE_BUILD_TYPE=Release "$@" &&
      cmake --build "$dir" -j4; } >"$dir.log" 2>&1 || { echo "BUILD FAILED: $name"; return 1; }
  rm -rf "$dir/pkg" && mkdir -p "$dir/pkg" && cp -r python/loraport "$dir/pkg/" && cp "$dir/_C.so" "$dir/pkg/loraport/_C.so"
}
with() {  # with NAME COMMAND...: run COMMAND against build NAME
  PYTHONPATH=$PWD/build/gpu-$1/pkg:$PWD LORAPORT_CUSOLVER_EIGH=require "${@:2}"
}

mkdir -p build
stage "four builds at once (logs: build.log); this GPU is sm_$gpu_arch, the fallback build holds sm_$other_arch only"
names=(default ptx fallback no-nvcc)
LORAPORT_CUDA_ARCHS= build default -DCMAKE_CUDA_FLAGS=--threads=0 & builds=($!)
LORAPORT_CUDA_ARCHS=80 build ptx & builds+=($!)
LORAPORT_CUDA_ARCHS=$other_arch-real build fallback & builds+=($!)
build no-nvcc -DLORAPORT_NVCC=OFF & builds+=($!)
wait "${builds[0]}"; echo "default build: exit code $?, done by $((SECONDS - start)) s"
generating=
if wanted port && [ -f build/gpu-default/pkg/loraport/_C.so ]; then
  stage "generating the half-size pair in the background (generate.log)"
  with default $py -c "from benchmarks.port_stream import generate; print(generate('/tmp/port_stream', 10, 20))" \
      >"$OUT/generate.log" 2>&1 &
  generating=$!
fi
for i in 1 2 3; do wait "${builds[$i]}"; echo "${names[$i]} build: exit code $?, done by $((SECONDS - start)) s"; done
cat build/gpu-*.log >"$OUT/build.log" 2>/dev/null
grep "loraport:" "$OUT/build.log"

cuda_tests() {  # cuda_tests NAME SECONDS LOG [FILES...]
  local name=$1 seconds=$2 log=$3
  shift 3
  [ -f "build/gpu-$name/pkg/loraport/_C.so" ] || { echo "---- $name: no build" >"$log"; return; }
  [ "$seconds" -gt 0 ] || { echo "---- $name: no time left" >"$log"; return; }
  {
    echo "---- $name: $(with "$name" $py -c 'import loraport; print(loraport.BUILD_INFO)' 2>&1 | tail -1)"
    with "$name" timeout "$seconds" $py -m pytest -q -m cuda -p no:cacheprovider "${@:-tests}" 2>&1
    echo "---- $name: pytest exit code $? (124: ran out of its $seconds s)"
  } >"$log"
}
summary() { grep -E "^---- |passed|failed|error|^(FAILED|ERROR)|loraport: this build|Fatal" "$1" | head -20; cat "$1" >>"$OUT/tests.log"; rm "$1"; }

# The default build's whole CUDA suite and the variants' build, op and port files, all at once.
testing=()
if wanted tests; then
  stage "default build: CUDA tests, LORAPORT_CUSOLVER_EIGH=require (and the variants' at the same time)"
  cuda_tests default "$(budget "${TESTS_S:-150}")" "$OUT/t-default.log" & testing+=($!)
fi
variants=()
if wanted variants; then
  seconds=$(budget "${VARIANT_TESTS_S:-150}")
  for name in ptx fallback no-nvcc; do
    cuda_tests "$name" "$seconds" "$OUT/t-$name.log" tests/test_build.py tests/test_ops.py tests/test_port.py & testing+=($!)
    variants+=("$name")
  done
fi
for pid in "${testing[@]}"; do wait "$pid"; done
for name in $(wanted tests && echo default) "${variants[@]}"; do summary "$OUT/t-$name.log"; done

if wanted diagnose && [ -f build/gpu-fallback/pkg/loraport/_C.so ]; then
  stage "fallback build: one rsvd call, and a backtrace under cuda-gdb if it crashes (diagnose.log)"
  printf '%s\n' "import torch, loraport" "A = torch.randn(3, 300, 200, device='cuda')" \
      "print(loraport.rsvd(A, 16, power_iters=2)[1][0, :4])" >/tmp/fallback_rsvd.py
  { with fallback timeout 60 $py -X faulthandler /tmp/fallback_rsvd.py 2>&1; status=$?; echo "exit code $status"
    if [ "$status" != 0 ]; then
      with fallback timeout "$(budget 90)" cuda-gdb -q -batch -ex run -ex bt --args $py /tmp/fallback_rsvd.py 2>&1 | tail -60
    fi; } >"$OUT/diagnose.log"
  tail -30 "$OUT/diagnose.log"
fi

if [ -n "$generating" ]; then
  stage "waiting for the half-size pair"
  wait "$generating"; echo "generate: exit code $?"; tail -2 "$OUT/generate.log"
  seconds=$(budget "${PORT_S:-200}")
  stage "default build: half-size streaming port (10 double + 20 single blocks), --max-vram 2GB, $seconds s"
  if [ "$seconds" -gt 0 ]; then
    with default timeout "$seconds" $py -m benchmarks.port_stream --blocks-double 10 --blocks-single 20 \
        --dir /tmp/port_stream --keep --device cuda --max-vram 2GB --markdown "$OUT/port_stream.md" \
        >"$OUT/port_stream.log" 2>&1
    echo "exit code $?"; grep -vE "^\|" "$OUT/port_stream.log" | tail -12; grep -E "^\|" "$OUT/port_stream.log" | cut -c1-240
  fi
  if wanted port_profile && [ "$(budget 60)" -gt 20 ]; then
    stage "default build: where the warm half-size port's time goes (cProfile, port_profile.txt)"
    spec='{"lora": "/tmp/port_stream/lora1.safetensors", "source": "/tmp/port_stream/source", "target": "/tmp/port_stream/target",
      "out": "/tmp/port_stream/profiled.safetensors", "cache": "", "device": "cuda", "max_vram": "2GB", "subspace_rank": null, "variant": "copy"}'
    # the environment the loraport CLI sets for itself, as the benchmark gives its port processes
    cli_env=$(with default $py -c "from loraport.startup import CLI_ENVIRONMENT as e; print(' '.join(f'{k}={v}' for k, v in e.items()))")
    with default env $cli_env timeout "$(budget 60)" $py -m cProfile -o /tmp/port.prof -m benchmarks.port_stream --child "$spec" >/dev/null 2>&1
    echo "exit code $?"
    $py -c "import pstats; s = pstats.Stats('/tmp/port.prof'); s.sort_stats('tottime').print_stats(35); s.sort_stats('cumtime').print_stats(35)" \
        >"$OUT/port_profile.txt" 2>&1
    grep -A40 "tottime" "$OUT/port_profile.txt" | head -45 | cut -c1-200
  fi
fi

if [ -n "$generating" ] && wanted port_buffered && [ "$(budget 80)" -gt 40 ]; then
  seconds=$(budget 80)
  stage "default build: the cold half-size port again, reading through the page cache (LORAPORT_DIRECT_IO=0), $seconds s"
  LORAPORT_DIRECT_IO=0 with default timeout "$seconds" $py -m benchmarks.port_stream --blocks-double 10 --blocks-single 20 \
      --dir /tmp/port_stream --keep --device cuda --max-vram 2GB --no-warm >"$OUT/port_buffered.log" 2>&1
  echo "exit code $?"; grep -E "^(- |\| (\*\*cold|port LoRA 1))" "$OUT/port_buffered.log" | cut -c1-240
fi

if wanted bench && [ "$(budget "${BENCH_S:-120}")" -gt 0 ]; then
  seconds=$(budget "${BENCH_S:-120}")
  stage "default build: rsvd benchmark, $seconds s"
  with default timeout "$seconds" $py -m benchmarks.rsvd --device cuda ${BENCH_ARGS:---ranks 64 --batch 4 --repeats 10} \
      --markdown "$OUT/rsvd_cuda.md" >"$OUT/bench.log" 2>&1
  echo "exit code $?"
  grep -E "^(## |ceilings|### )|^\| loraport (power|krylov) \||^\| torch" "$OUT/bench.log" | cut -c1-200
  tail -3 "$OUT/bench.log"
fi

if wanted profile && [ "$(budget "${PROFILE_S:-90}")" -gt 0 ]; then
  seconds=$(budget "${PROFILE_S:-90}")
  stage "default build: host syncs and profile of one rsvd call, $seconds s"
  with default timeout "$seconds" $py benchmarks/gpu_profile.py >"$OUT/profile.log" 2>&1
  echo "exit code $?"; tail -45 "$OUT/profile.log"
fi
stage "done"
