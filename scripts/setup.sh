#!/usr/bin/env bash
# Sets up a fresh machine: a virtual environment (default .venv, or $VENV), torch, and
# fanet_kernels with its compiled kernels and every optional dependency.
#   bash scripts/setup.sh            # then use .venv/bin/python, .venv/bin/fanet
# Environment: VENV, SETUP_LOG (keep the build output there), PYTHON (default python3), MAX_JOBS (default 2), FANET_CUDA (auto|0|1),
# TORCH_SPEC (default "torch==2.14.1 torchvision==0.29.1": a CUDA build, which is what lets the
# CUDA kernels compile; "torch==2.13.0" is a CPU-only build that skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip setuptools wheel ninja
echo "setup: installing $TORCH_SPEC"
# shellcheck disable=SC2086
"${PIP[@]}" install --quiet $TORCH_SPEC
# --no-build-isolation: compile against the torch just installed, not a second one that an
# isolated build environment would download.
echo "setup: building fanet_kernels (C++ CPU kernels; CUDA kernels when nvcc and a CUDA torch are present)"
# SETUP_LOG=file keeps the full compiler output (CI reads the ptxas report from it).
if [ -n "${SETUP_LOG:-}" ]; then
  mkdir -p "$(dirname "$SETUP_LOG")"
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install -v --no-build-isolation -e ".[all]" > "$SETUP_LOG" 2>&1 \
    || { tail -50 "$SETUP_LOG"; exit 1; }
else
  MAX_JOBS=${MAX_JOBS:-2} "${PIP[@]}" install --quiet --no-build-isolation -e ".[all]"
fi
"$VENV/bin/python" -c "import fanet_kernels as f; print('setup: fanet_kernels', f.__version__, '| backend for CPU tensors:', f.get_backend('cpu'), '| available:', ', '.join(f.available_backends('cpu')))"
