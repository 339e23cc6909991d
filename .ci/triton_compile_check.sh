#!/usr/bin/env bash
# Compiles the Triton kernels for real GPUs (sm_75 and sm_90) without a GPU or driver, with the ptxas
# that ships in the triton package, and fails on a compile error, a register spill or more than 128
# registers per thread.  Prints the register table; every row goes to build/triton_compile_check.json.
# Which launches it compiles, and how it finds them: scripts/triton_compile_check.py.
#
# Usage: .ci/triton_compile_check.sh [extra arguments of scripts/triton_compile_check.py]
#   The interpreter is $PYTHON, else the repository's .venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
mkdir -p "$ROOT/build"
start=$(date +%s)
status=0
env -u TRITON_INTERPRET "$PY" "$ROOT/scripts/triton_compile_check.py" --arch 75 90 \
  --json "$ROOT/build/triton_compile_check.json" "$@" || status=$?
echo "triton_compile_check: $(( $(date +%s) - start ))s, exit status $status"
exit "$status"
