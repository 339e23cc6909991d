#!/usr/bin/env bash
# Checks a CUDA build of fanet_kernels._C that no GPU can run here:
#   1. no compiler warning comes from the project's own sources (csrc/...);
#   2. ptxas's register/spill report of every kernel is written to a file, it covers sm_75, sm_80
#      and sm_90, and no kernel spills;
#   3. the extension holds sm_75, sm_80 and sm_90 machine code (cuobjdump --list-elf) and sm_90's
#      PTX (cuobjdump --list-ptx), which newer GPUs compile: the default TORCH_CUDA_ARCH_LIST.
#
# Usage: .ci/cuda_check.sh <path to _C*.so> <build log> [report file]
#   The build log is the full output of a build run with FANET_CUDA=1 FANET_PTXAS_VERBOSE=1
#   (setup.py passes -Xptxas=-v to nvcc then).  The report defaults to build/ptxas_report.txt.
#   cuobjdump is taken from $CUOBJDUMP, PATH, $CUDA_HOME/bin, or the PyPI wheel
#   nvidia-cuda-cuobjdump (else Triton's bundled copy) in the environment of $PYTHON, of the
#   repository's .venv, or of python3.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SO="${1:?usage: $0 <path to _C*.so> <build log> [report file]}"
LOG="${2:?usage: $0 <path to _C*.so> <build log> [report file]}"
REPORT="${3:-$ROOT/build/ptxas_report.txt}"

fail() { echo "cuda_check: FAIL: $*" >&2; exit 1; }
[[ -f "$SO" ]] || fail "extension '$SO' not found"
[[ -f "$LOG" ]] || fail "build log '$LOG' not found"

# ---- 1. warnings from the project's own files ----------------------------------------------
# gcc/nvcc host: "path:line:col: warning: ..."; nvcc front end: "path(line): warning #..-D: ...".
# Only paths under this repository's csrc/ count (torch's own include/torch/csrc does not).
own_warnings="$(grep -E '(:[0-9]+(:[0-9]+)?: warning|\([0-9]+\): warning)' "$LOG" \
  | grep -E "^[[:space:]]*(\./)?(${ROOT//./\\.}/)?csrc/" || true)"
if [[ -n "$own_warnings" ]]; then
  echo "$own_warnings" >&2
  fail "compiler warnings in the project's own files (above)"
fi
echo "cuda_check: no compiler warnings from $ROOT/csrc"

# ---- 2. ptxas register / spill report ----------------------------------------------------
# ptxas -v prints, per kernel and architecture:
#   ptxas info : Compiling entry function '<mangled>' for 'sm_80'
#   ptxas info : Function properties for <mangled>
#       <S> bytes stack frame, <T> bytes spill stores, <L> bytes spill loads
#   ptxas info : Used <R> registers, ...
mkdir -p "$(dirname "$REPORT")"
demangle() { if command -v c++filt >/dev/null; then c++filt; else cat; fi; }
{
  printf 'arch\tregisters\tstack_bytes\tspill_stores\tspill_loads\tkernel\n'
  awk '
    /Compiling entry function/ {
      match($0, /function \047[^\047]+\047/); name = substr($0, RSTART + 10, RLENGTH - 11)
      match($0, /for \047[a-z_0-9]+\047/); arch = substr($0, RSTART + 5, RLENGTH - 6)
      stack = st = ld = "?"; next
    }
    /bytes stack frame/ && name != "" {
      for (i = 1; i < NF; i++) {
        if ($(i + 1) == "bytes" && $(i + 2) == "stack") stack = $i
        if ($(i + 1) == "bytes" && $(i + 3) == "stores,") st = $i
        if ($(i + 1) == "bytes" && $(i + 3) == "loads") ld = $i
      }
      next
    }
    /ptxas info *: Used [0-9]+ registers/ && name != "" {
      match($0, /Used [0-9]+ registers/); regs = substr($0, RSTART + 5, RLENGTH - 15)
      printf "%s\t%s\t%s\t%s\t%s\t%s\n", arch, regs, stack, st, ld, name; name = ""
    }' "$LOG" | sort -u | demangle
} > "$REPORT"
kernels=$(($(wc -l < "$REPORT") - 1))
(( kernels > 0 )) || fail "no ptxas report in '$LOG': build with FANET_CUDA=1 FANET_PTXAS_VERBOSE=1"
spills="$(awk -F'\t' 'NR > 1 && ($4 != "0" || $5 != "0")' "$REPORT")"
if [[ -n "$spills" ]]; then
  echo "$spills" >&2
  fail "kernels spill registers to local memory (above; full report in $REPORT)"
fi
for arch in sm_75 sm_80 sm_90; do
  awk -F'\t' -v a="$arch" 'NR > 1 && $1 == a { found = 1 } END { exit !found }' "$REPORT" \
    || fail "no ptxas report for $arch in '$LOG' (was it built for TORCH_CUDA_ARCH_LIST=\"7.5;8.0;9.0+PTX\"?)"
done
max_regs=$(awk -F'\t' 'NR > 1 && $2 > m { m = $2 } END { print m + 0 }' "$REPORT")
echo "cuda_check: $kernels kernel builds (sm_75, sm_80, sm_90), none spills, at most $max_regs registers: $REPORT"

# ---- 3. machine code for sm_75, sm_80 and sm_90, PTX for sm_90 -----------------------------
find_cuobjdump() {
  if [[ -n "${CUOBJDUMP:-}" ]]; then echo "$CUOBJDUMP"; return; fi
  if command -v cuobjdump >/dev/null; then command -v cuobjdump; return; fi
  local cuda_home="${CUDA_HOME:-/usr/local/cuda}"
  if [[ -x "$cuda_home/bin/cuobjdump" ]]; then echo "$cuda_home/bin/cuobjdump"; return; fi
  # `pip install nvidia-cuda-cuobjdump` puts it at site-packages/nvidia/cu13/bin/cuobjdump;
  # Triton's wheel bundles one too.  Look in $PYTHON's, the repo's .venv's, then python3's.
  local py
  for py in ${PYTHON:-} "$ROOT/.venv/bin/python" python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    "$py" - <<'EOF' 2>/dev/null && return
import glob, os, sysconfig
paths = sysconfig.get_paths()
for pattern in ("nvidia/cu*/bin/cuobjdump", "triton/backends/nvidia/bin/cuobjdump"):
    for base in dict.fromkeys((paths["purelib"], paths["platlib"])):
        for path in sorted(glob.glob(os.path.join(base, pattern))):
            if os.access(path, os.X_OK):
                print(path)
                raise SystemExit(0)
raise SystemExit(1)
EOF
  done
}
CUOBJDUMP_BIN="$(find_cuobjdump || true)"
[[ -n "$CUOBJDUMP_BIN" ]] || fail "cuobjdump not found (pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP)"
elfs="$("$CUOBJDUMP_BIN" --list-elf "$SO")" || fail "cuobjdump --list-elf '$SO' failed"
echo "$elfs"
for arch in sm_75 sm_80 sm_90; do
  grep -q "\.${arch}\.cubin" <<<"$elfs" || fail "no $arch machine code in $SO"
done
ptxs="$("$CUOBJDUMP_BIN" --list-ptx "$SO")" || fail "cuobjdump --list-ptx '$SO' failed"
echo "$ptxs"
grep -q "\.sm_90\.ptx" <<<"$ptxs" || fail "no sm_90 PTX in $SO: GPUs newer than sm_90 could not run it"
echo "cuda_check: OK ($SO has sm_75, sm_80 and sm_90 machine code and sm_90 PTX)"
