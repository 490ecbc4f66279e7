#!/usr/bin/env bash
# The GPU check: build, GPU tests, compute-sanitizer, benchmark, profile, capacity and a
# run of the README's main job on CUDA, each step time-boxed.
#
#   OUT=/some/dir bash bench/gpu_check.sh        (default OUT: bench/out)
#
# Needs: a CUDA GPU, torch + triton preinstalled, no network (`python -m pip`, so that the
# build sees the same interpreter as torch; --no-deps, no build isolation). Every step
# logs to a temporary folder. On exit the reports land in $OUT -- bench.md / bench.csv
# (`python -m bench.run --preset gpu`, rewritten after every shape, largest C first),
# profile.md / .csv (`python -m bench.run profile`: forward/backward split with host
# times, cuBLAS GEMM yardsticks, launch-config variants), capacity.md (largest C per
# backend), host_overhead.md (dispatcher ops and µs of one tiny call) -- with every log in
# logs.tar.gz, and the tables are printed last. Each step is time-boxed from what is left
# of TOTAL_S, so the script ends in time even if a step hangs; a failed step does not
# stop the later ones.
#
# What each step checks:
#   install     the package and its C++/CUDA extension build here (else a CPU-only build)
#   test_ext    the CUDA tests outside tests/test_triton.py (extension ops, loss, autocast)
#   sanitize    racecheck / memcheck over the extension's own kernels
#   bench       time (fwd, fwd+bwd), peak extra memory and loss error of every backend
#               against the naive eager loss, and GEMM equivalents (4.0 = four cuBLAS
#               GEMMs of the shape, the floor of a forward+backward)
#   profile     where the step's time goes (GPU vs host), chunked-GEMM costs, Triton
#               launch configs against the chunked backend's numbers, and host op counts
#   test_triton the Triton kernels' GPU tests (bf16/fp16, 2^31-element W, GPU configs)
#   capacity    the largest C each backend fits in this GPU's free memory, confirmed
#   quickstart  `python -m bench.run --device cuda` end to end at one toy shape
#
# Knobs (environment):
#   GPU_CHECK_TOTAL_S   whole-script target in seconds (default 450)
#   GPU_CHECK_STEPS     which steps (default: all of them)
#                       test_ext sanitize test_triton bench profile capacity quickstart
#                       (they run in the order test_ext sanitize bench profile test_triton
#                       capacity quickstart)
#   GPU_BENCH_ARGS      arguments of `python -m bench.run` in the bench step (default:
#                       the gpu preset at C = 2^20, 2^18, 2^16 (largest first), B = 512
#                       and 1024, bf16 and fp16-x/fp32-W, the naive loss, its compiled
#                       twin and the four library backends; the step adds --budget-s,
#                       which cuts the sweep short). For the C = 2^20 rows alone:
#                       "--preset gpu --C 1048576 --B 512 1024 --dtypes bf16 fp16-fp32
#                       --backends naive triton extension --no-sweep".
#   GPU_TRITON_TEST_ARGS  extra pytest arguments of the Triton test step (split on spaces)
#   GPU_TRITON_TEST_K   its -k expression, spaces allowed (e.g. "gpu and not candidates")
#   GPU_PROFILE_PARTS   parts of `bench.run profile` in the profile step (default: split
#                       variants)
#   GPU_PROFILE_ARGS    extra arguments of that step (e.g. "--B 1024")
#   GPU_SANITIZE_TOOLS  compute-sanitizer tools of the sanitize step (default: racecheck memcheck)
#   GPU_SANITIZE_KERNELS  regex of the kernel names it instruments (default: the extension's)
#   GPU_SANITIZE_K      its pytest -k expression over tests/test_extension.py and
#                       tests/test_prologue.py (default: every CUDA test but the error
#                       paths, the SASS check and opcheck)
#   GPU_CUTLASS_WHEEL   the nvidia-cutlass wheel the opt-in `cutlass` step takes its
#                       headers from when EXPFACE_CUTLASS_DIR is unset (default: the
#                       newest .cutlass/nvidia_cutlass-*.whl, an ignored folder that travels
#                       with the tree; the GPU machine has no network). The step is not in
#                       the default list (its build alone takes minutes; with the install,
#                       the float64 checks, the timing and memcheck, about 8 minutes):
#                       GPU_CHECK_STEPS=cutlass GPU_CHECK_TOTAL_S=540 bash bench/gpu_check.sh
#                       The GPU check script is bench/gpu_cutlass.py (tables in
#                       cutlass_check.md / .csv).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
# Everything is written to $LOG first; on exit the reports are copied to $OUT under flat
# names and the whole of $LOG is packed into $OUT/logs.tar.gz.
LOG=$(mktemp -d /tmp/gpu_check.XXXXXX)
pack() {
  cp "$LOG"/*.md "$OUT"/ 2>/dev/null
  for f in bench/table.md:bench.md bench/results.csv:bench.csv profile/profile.md:profile.md \
           profile/profile.csv:profile.csv capacity/profile.md:capacity.md; do
    [ -s "$LOG/${f%%:*}" ] && cp "$LOG/${f%%:*}" "$OUT/${f#*:}"
  done
  tar -czf "$OUT/logs.tar.gz" -C "$LOG" . 2>/dev/null
}
trap pack EXIT
T0=$(date +%s)
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
STEPS=" ${GPU_CHECK_STEPS:-test_ext sanitize test_triton bench profile capacity quickstart} "
elapsed() { echo $(( $(date +%s) - T0 )); }
# box MAX RESERVE [MIN]: at most MAX seconds, leaving RESERVE seconds for the later
# steps, but at least MIN (default 20)
box() {
  local left=$(( TOTAL_S - $(elapsed) - $2 ))
  [ "$left" -gt "$1" ] && left=$1
  [ "$left" -lt "${3:-20}" ] && left=${3:-20}
  echo "$left"
}
# pytest_step LABEL LOGFILE SECONDS ARGS...: one time-boxed pytest run, its last line in
# the summary, its failures listed
pytest_step() {
  local label=$1 log=$2 secs=$3
  shift 3
  timeout "$secs" python -m pytest -q -p no:cacheprovider "$@" > "$LOG/$log" 2>&1
  local rc=$?
  status+=("$label: rc=$rc: $(tail -n 1 "$LOG/$log")")
  grep -E "^(FAILED|ERROR)" "$LOG/$log" | head -n 20
  return $rc
}
want() { [[ "$STEPS" == *" $1 "* ]]; }
status=()
export PYTHONUNBUFFERED=1

echo "== environment"
{ nvidia-smi || true; python - <<'PY'
import torch, triton
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")
PY
} > "$LOG/env.log" 2>&1
tail -n 2 "$LOG/env.log"

echo "== pip install (t=$(elapsed)s)"
# Builds the C++/CUDA extension too (MAX_JOBS default 16; setup.py's sm_80 + sm_90:
# 32 s for sm_90a alone on a 16-core H200 host).
if MAX_JOBS=${MAX_JOBS:-16} timeout "$(box 200 100)" python -m pip install --no-build-isolation --no-deps -e . \
     > "$LOG/pip_install.log" 2>&1; then
  status+=("install: ok")
else
  echo "   install failed or timed out (see pip_install.log); retrying without the CUDA sources"
  tail -n 30 "$LOG/pip_install.log"
  if FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-16} timeout "$(box 90 150)" python -m pip install --no-build-isolation --no-deps -e . \
       >> "$LOG/pip_install.log" 2>&1; then
    status+=("install: CPU-only extension (the CUDA build failed or timed out)")
  else
    status+=("install: FAILED")
  fi
fi
python -c "import expface_kernels as ek, expface_kernels.extension as e; print(ek.available_backends(), 'ext cuda:', e.built_with_cuda())" \
  > "$LOG/backends.log" 2>&1
cat "$LOG/backends.log"
echo "   install done at t=$(elapsed)s"

if want test_ext; then
  echo "== GPU tests of the extension and the loss (t=$(elapsed)s)"
  # The error-path test of the CUDA ops alone first: it crashed the interpreter once
  # (H200, torch 2.11, 2026-11-28); on a crash, a native backtrace through cuda-gdb.
  PYTHONFAULTHANDLER=1 pytest_step "pytest test_cuda_rejects_float64_and_mixed_devices" pytest_cuda_rejects.log 60 \
    tests/test_extension.py -k "cuda_rejects"
  rc=$?
  if [ "$rc" -ge 128 ] && command -v cuda-gdb > /dev/null; then
    timeout 90 cuda-gdb -batch -ex run -ex bt -ex "info threads" --args python -m pytest -q -p no:cacheprovider \
      tests/test_extension.py -k "cuda_rejects" > "$LOG/cuda_gdb_backtrace.log" 2>&1
    echo "   crash backtrace:"; grep -E "^#" "$LOG/cuda_gdb_backtrace.log" | head -n 25
  fi
  # The CUDA tests of the other files (names mention cuda/gpu); test_triton.py separately.
  pytest_step "pytest tests -k 'cuda or gpu' (not test_triton)" pytest_gpu_other.log "$(box 90 150)" \
    tests -k "(cuda or gpu) and not cuda_rejects" --ignore=tests/test_triton.py
fi

if want sanitize; then
  echo "== compute-sanitizer on the extension's own kernels (t=$(elapsed)s)"
  # racecheck: shared-memory hazards of the tile epilogues' block merges; memcheck (no
  # caching allocator, so that a read past a tensor's end leaves its allocation): the
  # 16-byte loads at chunk tails. Only the extension's kernels are instrumented.
  SAN_TESTS=(tests/test_extension.py tests/test_prologue.py -k "${GPU_SANITIZE_K:-cuda and not rejects and not sass and not opcheck}")
  SAN_KERNELS="kns=${GPU_SANITIZE_KERNELS:-tile_kernel|project_rows|row_inv_norm|prologue_kernel|margin_terms|normalize_backward|fused_rows|epilogue_kernel}"
  PATH=$PATH:${CUDA_HOME:-/usr/local/cuda}/bin
  if command -v compute-sanitizer > /dev/null; then
    for tool in ${GPU_SANITIZE_TOOLS:-racecheck memcheck}; do
      for filter in --kernel-regex ""; do  # unfiltered only if this sanitizer rejects the filter
        # (torch reads PYTORCH_NO_CUDA_MEMORY_CACHING as set or unset, not its value)
        env $([ $tool = memcheck ] && echo PYTORCH_NO_CUDA_MEMORY_CACHING=1) \
          timeout "$(box 70 200 30)" compute-sanitizer --tool $tool ${filter:+$filter "$SAN_KERNELS"} --error-exitcode 99 \
          --print-limit 20 python -m pytest -q -p no:cacheprovider "${SAN_TESTS[@]}" > "$LOG/sanitize_$tool.log" 2>&1
        rc=$?
        grep -qE "passed|failed|ERROR SUMMARY: [1-9]" "$LOG/sanitize_$tool.log" && break
        [ "$rc" = 124 ] && break
        head -n 5 "$LOG/sanitize_$tool.log"
      done
      status+=("compute-sanitizer $tool: rc=$rc: $(grep -E 'ERROR SUMMARY|passed|failed' "$LOG/sanitize_$tool.log" | tail -n 2 | tr '\n' ' ')")
      grep -E "ERROR SUMMARY|Race reported|Invalid|Error: " "$LOG/sanitize_$tool.log" | head -n 8
    done
  else
    status+=("compute-sanitizer: not on this machine")
  fi
fi

if want bench; then
  echo "== benchmark (t=$(elapsed)s)"
  BUDGET=$(box 150 150 40)
  # --budget-s: no new shape starts after it; the timeout kills a shape that overruns
  # (the tables written after the previous shapes stay).
  # shellcheck disable=SC2086
  timeout $(( BUDGET + 60 )) python -m bench.run --budget-s "$BUDGET" --out "$LOG/bench" --no-plots \
    ${GPU_BENCH_ARGS:---preset gpu --C 1048576 262144 65536 --B 512 1024 --dtypes bf16 fp16-fp32 \
      --backends naive naive_compile reference chunked triton extension --no-sweep} \
    > "$LOG/bench.log" 2>&1
  rc=$?; status+=("benchmark: rc=$rc (budget ${BUDGET}s)")
fi

if want profile; then
  echo "== profile: split, variants (t=$(elapsed)s)"
  PB=$(box 150 110 30)
  # shellcheck disable=SC2086
  timeout $(( PB + 40 )) python -m bench.run profile --parts ${GPU_PROFILE_PARTS:-split variants} --budget-s "$PB" \
    --out "$LOG/profile" ${GPU_PROFILE_ARGS:-} > "$LOG/profile.log" 2>&1
  rc=$?; status+=("profile: rc=$rc (budget ${PB}s)")
fi

if want profile; then
  # Host cost of one tiny call (ops issued, µs), extension ops vs PyTorch ops for the
  # per-row work: a few seconds.
  timeout 60 python -m bench.run host --device cuda --calls 500 --out "$LOG" > "$LOG/host_overhead.log" 2>&1
  status+=("host_overhead: rc=$?")
fi

if want test_triton; then
  echo "== GPU tests of the Triton kernels (t=$(elapsed)s)"
  # tests/test_triton.py runs entirely on CUDA here (bf16/fp16, 2^31-element W, GPU configs).
  # shellcheck disable=SC2086
  pytest_step "pytest tests/test_triton.py" pytest_triton.log "$(box 150 45)" tests/test_triton.py \
    ${GPU_TRITON_TEST_K:+-k "$GPU_TRITON_TEST_K"} ${GPU_TRITON_TEST_ARGS:-}
fi

if want capacity; then
  echo "== capacity: largest C per backend (t=$(elapsed)s)"
  CB=$(box 100000 25)
  timeout $(( CB + 20 )) python -m bench.run profile --parts capacity --budget-s "$CB" --out "$LOG/capacity" \
    > "$LOG/capacity.log" 2>&1
  rc=$?; status+=("capacity: rc=$rc (budget ${CB}s)")
fi

if want quickstart; then
  echo "== quickstart: python -m bench.run on CUDA, one small shape (t=$(elapsed)s)"
  # The README's main job picks the GPU by default (the gpu preset); this checks its CUDA
  # path end to end (timing, in-process memory, errors, table, plots) at a toy shape; the
  # numbers are not kept.
  timeout "$(box 90 0)" python -m bench.run --device cuda --C 16384 --B 64 --D 64 --rounds 2 \
    --no-sweep --backends naive chunked triton extension --out "$LOG/quickstart" \
    > "$LOG/quickstart.log" 2>&1
  rc=$?; status+=("quickstart (bench.run --device cuda): rc=$rc: $(grep -c '^| ' "$LOG/quickstart.log") table rows")
fi

if want cutlass; then
  echo "== fused CUTLASS kernels (sm_90a): build, float64 checks, timing, memcheck (t=$(elapsed)s)"
  # Headers: EXPFACE_CUTLASS_DIR, else the carried wheel unpacked here (no pip install).
  if [ -z "${EXPFACE_CUTLASS_DIR:-}" ]; then
    WHEEL=${GPU_CUTLASS_WHEEL:-$(ls -1 .cutlass/nvidia_cutlass-*.whl 2>/dev/null | tail -n 1)}
    if [ -n "$WHEEL" ] && python -m zipfile -e "$WHEEL" "$LOG/cutlass_wheel" > /dev/null 2>&1; then
      export EXPFACE_CUTLASS_DIR="$LOG/cutlass_wheel/cutlass_library/source"
    fi
  fi
  CUTLASS_BUILD=${GPU_CUTLASS_BUILD_DIR:-/tmp/expface_cutlass_build}
  timeout "$(box 420 20 60)" python bench/gpu_cutlass.py --out "$LOG" --build-dir "$CUTLASS_BUILD" \
    --budget-s "$(box 120 60 30)" > "$LOG/gpu_cutlass.log" 2>&1
  rc=$?; status+=("cutlass: rc=$rc: $(grep -E '^## correctness' "$LOG/gpu_cutlass.log" | head -n 1)")
  tail -n 25 "$LOG/gpu_cutlass.log"
  PATH=$PATH:${CUDA_HOME:-/usr/local/cuda}/bin
  if [ "$rc" != 124 ] && command -v compute-sanitizer > /dev/null; then
    # The correctness cases again (the build is cached in $CUTLASS_BUILD), under memcheck,
    # with only the CUTLASS kernels instrumented (their names carry the ek_cutlass namespace).
    env PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$(box 150 0 30)" compute-sanitizer --tool memcheck \
      --kernel-regex kns=ek_cutlass --error-exitcode 99 --print-limit 20 \
      python bench/gpu_cutlass.py --out "$LOG/cutlass_memcheck" --build-dir "$CUTLASS_BUILD" --skip-timing \
      > "$LOG/sanitize_cutlass_memcheck.log" 2>&1
    rc=$?; status+=("cutlass memcheck: rc=$rc: $(grep -E 'ERROR SUMMARY' "$LOG/sanitize_cutlass_memcheck.log" | tail -n 1)")
  fi
fi

echo "== summary (t=$(elapsed)s)"
printf '   %s\n' "${status[@]}"
echo
# The tables last.
# (the profiler's kernel tables stay in the file: they would push the others out of view)
[ -s "$LOG/cutlass_check.md" ] && cat "$LOG/cutlass_check.md"
for f in profile/profile.md capacity/profile.md; do
  [ -s "$LOG/$f" ] && awk '/^```/{f=!f; next} !f' "$LOG/$f"
done
[ -s "$LOG/host_overhead.md" ] && cat "$LOG/host_overhead.md"
if [ -s "$LOG/bench/table.md" ]; then cat "$LOG/bench/table.md"; elif [ -s "$LOG/bench.log" ]; then tail -n 40 "$LOG/bench.log"; fi
