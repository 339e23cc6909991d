#!/usr/bin/env bash
# shellcheck disable=SC2317  # functions called indirectly: the lanes ("$lane" &) and the trap handler
# One command for a machine with a GPU: build fanet_kernels in place against that machine's own
# torch and triton, run the CUDA test targets, the bit-identity and cross-process determinism
# checks, compute-sanitizer and the quick GPU benchmarks, and write OUTDIR/summary.md.
#
#   bash scripts/gpu_check.sh OUTDIR                 # everything, in at most 480 s
#   bash scripts/gpu_check.sh --help                 # the steps, options and environment
#
# The total stays inside --budget by construction: every step runs under `timeout` with at most
# the time left in its phase, a step that no longer fits is skipped (and named in the summary),
# and the report has a reserve of its own.  Correctness steps run side by side in three lanes
# (one GPU, 16 cores); the benchmarks run alone afterwards.
set -uo pipefail  # no -e: a failing step is recorded and the others still run

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS="build tests-cuda tests-ops memcheck racecheck determinism tests-triton bench"
USAGE="usage: bash scripts/gpu_check.sh [--budget SECONDS] [--skip STEP[,STEP...]] [--dry-run] OUTDIR"
RESERVE=15  # seconds kept for the report at the end
GRACE=10    # seconds between a step's SIGINT (pytest writes its JUnit file) and SIGKILL
HEARTBEAT=${GPU_CHECK_HEARTBEAT:-30}

help() {
  cat <<EOF
$USAGE

Runs on a machine with a CUDA GPU, offline, with the torch and triton already installed there, and
writes everything under OUTDIR (summary.md first).  Steps, in priority order:
  build         $PYTHON_NAME -m pip install --no-index --no-build-isolation --no-deps -e . (FANET_CUDA=1,
                MAX_JOBS=\$(nproc)); setup.py build_ext --inplace if pip cannot install editable
  tests-cuda    pytest tests/test_cuda.py -m cuda (the CUDA-only cases and the bit-identity check)
  tests-ops     pytest tests/ -m cuda, the rest: every op target on CUDA tensors (cuda-cuda, triton-cuda)
  memcheck      compute-sanitizer --tool memcheck over scripts/gpu_sanitize.py (every CUDA kernel)
  racecheck     compute-sanitizer --tool racecheck over the same
  determinism   scripts/gpu_determinism.py: every op forward+backward in two processes, compared bitwise
  tests-triton  pytest tests/test_triton*.py -m 'not cuda' (they run on CUDA tensors where there is a GPU)
  bench         benchmarks/gpu_quick.py: fused ops vs a copy of the same bytes, FA-ResNet-56 vs ResNet-56
Options:
  --budget S    total seconds, build and report included (default 480)
  --skip LIST   steps to leave out, comma-separated
  --dry-run     no GPU needed: run nothing, record each step's command (tests the bookkeeping)
Environment: PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: setup.py's),
  GPU_CHECK_DRY_SLEEP (seconds each dry-run step takes), GPU_CHECK_HEARTBEAT (progress period, s).
Exit status: 0 all run steps passed, 1 something failed, 2 usage error or no GPU.
EOF
}

usage_error() {
  echo "gpu_check: $1" >&2
  echo "$USAGE" >&2
  exit 2
}

PYTHON_NAME=${PYTHON:-python3}
BUDGET=480
SKIP=","
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) help; exit 0 ;;
    --budget) [ $# -ge 2 ] || usage_error "--budget needs a number of seconds"; BUDGET=$2; shift 2 ;;
    --budget=*) BUDGET=${1#*=}; shift ;;
    --skip) [ $# -ge 2 ] || usage_error "--skip needs a list of steps"; SKIP="$SKIP$2,"; shift 2 ;;
    --skip=*) SKIP="$SKIP${1#*=},"; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; [ $# -le 1 ] || usage_error "one OUTDIR only, got: $*"; [ $# -eq 0 ] || OUT=$1; break ;;
    -*) usage_error "unknown option '$1'" ;;
    *) [ -z "$OUT" ] || usage_error "one OUTDIR only, got '$OUT' and '$1'"; OUT=$1; shift ;;
  esac
done
[ -n "$OUT" ] || usage_error "OUTDIR is missing"
if ! [[ "$BUDGET" =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 1 ]; then
  usage_error "--budget must be a positive whole number of seconds, got '$BUDGET'"
fi
for s in $(echo "$SKIP" | tr ',' ' '); do
  [[ " $STEPS " == *" $s "* ]] || usage_error "--skip: unknown step '$s' (steps: $STEPS)"
done

PY=$PYTHON_NAME
no_gpu() {  # exactly one line, before anything is built or written
  echo "gpu_check: no GPU here ($1); nothing was run" >&2
  exit 2
}
ENV_INFO=""
if [ "$DRY" = 0 ]; then
  command -v "$PY" > /dev/null 2>&1 || no_gpu "no python: '$PY' not found, set PYTHON"
  command -v nvidia-smi > /dev/null 2>&1 || no_gpu "nvidia-smi not found"
  nvidia-smi -L 2> /dev/null | grep -q '^GPU ' || no_gpu "nvidia-smi -L lists no GPU"
  # shellcheck disable=SC2016  # python source, not shell
  ENV_INFO=$("$PY" -c '
import platform, torch
assert torch.cuda.is_available()
p = torch.cuda.get_device_properties(0)
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({type(e).__name__})"
print(f"gpu: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
      f"{p.multi_processor_count} SMs ({torch.cuda.device_count()} visible)")
print(f"python: {platform.python_version()}; torch: {torch.__version__} (CUDA {torch.version.cuda}); triton: {tv}")
' 2> /dev/null) || no_gpu "torch.cuda.is_available() is False in $PY"
fi

mkdir -p "$OUT" || usage_error "cannot create OUTDIR '$OUT'"
OUT=$(cd "$OUT" && pwd)
rm -rf "$OUT/.running" "$OUT/steps.tsv" "$OUT"/junit*.xml "$OUT/summary.md"
mkdir -p "$OUT/.running"
: > "$OUT/steps.tsv"
cd "$ROOT" || exit 2
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PY OUT
NPROC=$(nproc 2> /dev/null || echo 4)
T_END=$((BUDGET - RESERVE))

say() { printf '[%4ds] %s\n' "$SECONDS" "$*"; }

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "host: $(uname -n), $NPROC cores"
  if [ "$DRY" = 0 ]; then
    echo "$ENV_INFO"
    echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -1)"
    nvcc_version=$( (nvcc --version || /usr/local/cuda/bin/nvcc --version) 2> /dev/null | grep -o 'release [0-9.]*')
    echo "nvcc: ${nvcc_version:-not found}"
  else
    echo "mode: dry run (nothing was run)"
  fi
  dirty=$(git -C "$ROOT" status --porcelain 2> /dev/null | head -1)
  echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo unknown)${dirty:+ (with local changes)}"
  echo "budget: $BUDGET s"
} > "$OUT/env.txt"
say "gpu_check: results in $OUT (budget ${BUDGET}s)"
sed 's/^/         /' "$OUT/env.txt"

# ---- steps --------------------------------------------------------------------------------
record() {  # NAME STATUS SECONDS RC LOG NOTE: one line of steps.tsv (gpu_report.py reads it)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$(echo "$6" | tr '\t\n' '  ')" >> "$OUT/steps.tsv"
}

# run_step NAME BUDGET MIN CMD...: runs CMD (output to OUTDIR/NAME.log) for at most BUDGET seconds
# and never past the phase's end; skips it when less than MIN seconds are left.  "@BUDGET@" in CMD
# becomes the seconds the command has, so a script can end on its own before the timeout.
run_step() {
  local name=$1 budget=$2 min=$3 log="$OUT/$1.log" t0=$SECONDS left avail rc status
  shift 3
  if [[ "$SKIP" == *",$name,"* ]]; then
    record "$name" skipped 0 - "" "left out with --skip"
    say "-- $name: skipped (--skip)"
    return 0
  fi
  left=$((PHASE_END - SECONDS))
  avail=$((budget < left ? budget : left))
  if [ "$avail" -lt "$min" ]; then
    record "$name" skipped 0 - "" "out of time: ${left}s left in its phase, needs at least ${min}s"
    say "-- $name: skipped, out of time (${left}s left, needs ${min}s)"
    return 0
  fi
  local cmd=("${@//@BUDGET@/$((avail - GRACE - 5))}")
  say ">> $name (up to ${avail}s): ${cmd[*]}"
  if [ "$DRY" = 1 ]; then
    echo "$name $t0" > "$OUT/.running/$name"
    echo "dry run, would run: ${cmd[*]}" > "$log"
    sleep "${GPU_CHECK_DRY_SLEEP:-0}"
    rc=0
  else
    echo "+ ${cmd[*]}" > "$log"
    # timeout puts itself and the command in a process group of their own, named by its pid.
    timeout -s INT -k "$GRACE" "$((avail - GRACE))" "${cmd[@]}" >> "$log" 2>&1 &
    echo "$name $t0 $!" > "$OUT/.running/$name"
    wait "$!" 2> /dev/null  # (bash's "Killed" notice when -k had to kill: the status says it)
    rc=$?
  fi
  case "$rc" in
    0) status=ok ;;
    124|137) status=timeout ;;
    5) status=empty ;;  # pytest: no tests collected
    *) status=failed ;;
  esac
  [ "$DRY" = 1 ] && status=dry-run
  record "$name" "$status" "$((SECONDS - t0))" "$rc" "$log" "${cmd[*]}"
  rm -f "$OUT/.running/$name"
  say "<< $name: $status in $((SECONDS - t0))s (exit $rc; log $log)"
}

# The build, and a check that the CUDA kernels are in it.
build() {  # runs under `bash -c` with PY exported and MAX_JOBS, FANET_CUDA set by its step
  # pyproject.toml's SPDX license string needs setuptools >= 77; an older one (nothing can be
  # installed there) reads the table form, which says the same.
  local st
  st=$("$PY" -c "import setuptools; print(setuptools.__version__)" 2>/dev/null || echo 0)
  echo "setuptools $st"
  if [ "${st%%.*}" -lt 77 ] 2>/dev/null; then
    echo "gpu_check: setuptools $st < 77: pyproject.toml's license becomes { text = ... } for this build"
    sed -i 's/^license = "\(.*\)"$/license = { text = "\1" }/' pyproject.toml
  fi
  echo "+ MAX_JOBS=$MAX_JOBS FANET_CUDA=$FANET_CUDA $PY -m pip install --no-index --no-build-isolation --no-deps -v -e ."
  if ! "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .; then
    echo "gpu_check: pip could not install editable; falling back to: $PY setup.py build_ext --inplace"
    "$PY" setup.py build_ext --inplace || return 1
  fi
  "$PY" -c '
import fanet_kernels as fk
from fanet_kernels import backends
print("available for CUDA tensors:", ", ".join(fk.available_backends("cuda")))
for b in ("cuda", "triton"):
    if b not in fk.available_backends("cuda"):
        raise SystemExit(f"error: backend {b!r} is not available for CUDA tensors: {backends.unavailable_reason(b)}")
'
}
export -f build

have_module() { "$PY" -c "import $1" > /dev/null 2>&1; }

PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rfEs -o junit_logging=system-out)
XDIST=()
if [ "$DRY" = 0 ]; then
  have_module pytest_timeout && PYTEST+=(--timeout=180)
  have_module xdist && XDIST=(-n "$((NPROC / 2 < 8 ? (NPROC / 2 > 0 ? NPROC / 2 : 1) : 8))")
fi

SANITIZER=$(command -v compute-sanitizer 2> /dev/null || true)
for d in /usr/local/cuda/bin "${CUDA_HOME:-/nonexistent}/bin"; do
  [ -z "$SANITIZER" ] && [ -x "$d/compute-sanitizer" ] && SANITIZER="$d/compute-sanitizer"
done

sanitize() {  # TOOL: compute-sanitizer over every CUDA kernel, or a recorded skip with the reason
  if [ -z "$SANITIZER" ] && [ "$DRY" = 0 ]; then
    record "$1" skipped 0 - "" "compute-sanitizer not found (PATH, /usr/local/cuda/bin, \$CUDA_HOME/bin)"
    say "-- $1: skipped (compute-sanitizer not found)"
    return 0
  fi
  local extra=()
  # Without the caching allocator every tensor is its own cudaMalloc, so memcheck sees overruns.
  [ "$1" = memcheck ] && extra=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  # --report-api-errors no: torch's own probing calls that fail by design are not the kernels' errors.
  run_step "$1" 150 30 ${extra[@]+"${extra[@]}"} "${SANITIZER:-compute-sanitizer}" --tool "$1" --error-exitcode 3 \
    --print-limit 20 --report-api-errors no "$PY" scripts/gpu_sanitize.py
}

lane_tests() {
  run_step tests-cuda 90 20 "${PYTEST[@]}" tests/test_cuda.py -m cuda --junitxml="$OUT/junit_cuda.xml"
  run_step tests-ops $((PHASE_END - SECONDS)) 30 env TORCHINDUCTOR_COMPILE_THREADS=1 "${PYTEST[@]}" \
    ${XDIST[@]+"${XDIST[@]}"} tests -m cuda --ignore=tests/test_cuda.py --junitxml="$OUT/junit_ops.xml"
}
lane_sanitizer() {
  sanitize memcheck
  sanitize racecheck
}
lane_determinism() {
  run_step determinism 150 30 "$PY" scripts/gpu_determinism.py --out "$OUT/determinism.json" \
    --workdir "$OUT/determinism" --budget @BUDGET@
  # The Triton test files run on CUDA tensors where there is a GPU (the interpreter's CPU tensors
  # elsewhere), unmarked: -m cuda above does not select them.
  run_step tests-triton $((PHASE_END - SECONDS)) 20 env TORCHINDUCTOR_COMPILE_THREADS=1 "${PYTEST[@]}" \
    tests/test_triton*.py -m "not cuda" --junitxml="$OUT/junit_triton.xml"
}
lane_build() {
  run_step build 240 60 env FANET_CUDA=1 FANET_PTXAS_VERBOSE=1 MAX_JOBS="$NPROC" \
    NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:+$NVCC_APPEND_FLAGS }--threads $NPROC" bash -c build
}
lane_bench() {
  run_step bench $((PHASE_END - SECONDS)) 45 "$PY" benchmarks/gpu_quick.py --out "$OUT/bench.json" --budget @BUDGET@
}

LANE_PIDS=()
stop_lanes() {
  local f name t0 group
  for f in "$OUT"/.running/*; do
    [ -e "$f" ] || continue
    read -r name t0 group < "$f"
    [ -n "$group" ] && kill -INT -- "-$group" 2> /dev/null
  done
  for p in "${LANE_PIDS[@]}"; do kill -TERM "$p" 2> /dev/null; done
  say "gpu_check: interrupted; no summary written"
  exit 130
}
trap stop_lanes INT TERM

heartbeat() {
  local f name t0 line
  for f in "$OUT"/.running/*; do
    [ -e "$f" ] || continue
    read -r name t0 _ < "$f"
    line=$(tail -c 2000 "$OUT/$name.log" 2> /dev/null | tr '\r' '\n' | grep -v '^[[:space:]]*$' | tail -1 | cut -c1-100)
    say ".. $name running for $((SECONDS - t0))s: $line"
  done
}

# phase END LANE...: runs the lanes side by side until each is done; none runs past END.
phase() {
  PHASE_END=$1
  shift
  LANE_PIDS=()
  local lane p alive last=$SECONDS
  for lane in "$@"; do
    "$lane" &
    LANE_PIDS+=($!)
  done
  while :; do
    alive=0
    for p in "${LANE_PIDS[@]}"; do kill -0 "$p" 2> /dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 1
    if [ $((SECONDS - last)) -ge "$HEARTBEAT" ]; then
      last=$SECONDS
      heartbeat
    fi
  done
  wait
}

phase "$T_END" lane_build
# Correctness gets a little over half of what is left, the benchmarks the rest (and whatever the
# correctness lanes did not use).
phase $((SECONDS + (T_END - SECONDS) * 55 / 100)) lane_tests lane_sanitizer lane_determinism
phase "$T_END" lane_bench

say "writing $OUT/summary.md"
echo "elapsed: ${SECONDS} s before the report" >> "$OUT/env.txt"
left=$((BUDGET - SECONDS))
timeout -k 2 "$((left > 3 ? left - 2 : 1))" "$PY" scripts/gpu_report.py "$OUT"
rc=$?
rm -rf "$OUT/.running"
say "gpu_check: done in ${SECONDS}s, exit $rc"
exit "$rc"
