#!/usr/bin/env bash
# The oldest torch and triton that pyproject.toml claims, in a second virtual environment
# (.venv-oldest): builds the extension there and runs the op suite's CPU targets ("cpu", and
# "triton" under TRITON_INTERPRET=1, plus the target-less op tests) of the op families' test files
# (tests/test_gate.py, test_residual.py, test_bn_gate.py, test_focus.py), and the CPU kernels' SIMD
# levels (tests/test_cpu_dispatch.py).  Only the C++ CPU kernels are built (FANET_CUDA=0): the main
# environment's step compiles the CUDA sources.  The build runs on a copy of the working tree
# in build/oldest/src, so its _C*.so cannot replace the main environment's in-place one (both
# are built for the same Python).  Fails if pyproject.toml's lower bounds for torch and triton
# are not the versions tested here.
#   OLDEST_SPEC="torch==2.11.0 triton==3.6.0 numpy<2.4" bash .ci/oldest_env.sh   # alone (.ci/run sets it)
# The build is a plain `pip install -e .` (pip's isolated build, with no torch among its
# requirements), so this also checks that the README's install command works as typed.
# Environment: OLDEST_SPEC (pip requirements, also used as constraints), PYTHON (default
# python3), MAX_JOBS (default 2), OLDEST_CLEANUP=1 (delete .venv-oldest and build/oldest after a
# pass: .ci/run sets it, to free the disk for the main environment).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OLDEST_SPEC:?set OLDEST_SPEC, e.g. OLDEST_SPEC=\"torch==2.11.0 triton==3.6.0 numpy<2.4\" (.ci/run sets it)}"
PYTHON=${PYTHON:-python3}
VENV=$PWD/.venv-oldest
WORK=$PWD/build/oldest
SRC=build/oldest/src
T0=$(date +%s)
log() { echo "oldest-env [$(( $(date +%s) - T0 ))s]: $*"; }

log "copying the working tree to $SRC"
rm -rf build/oldest
mkdir -p "$SRC"
# Tracked and untracked-but-not-ignored files that exist (a file deleted in the tree is skipped).
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$SRC"
# The spec doubles as a constraints file: if pyproject.toml's claims exclude these versions,
# pip fails instead of quietly installing newer ones.
tr ' ' '\n' <<< "$OLDEST_SPEC" | grep -v '^$' > build/oldest/constraints.txt

log "creating $VENV and installing $OLDEST_SPEC"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install --quiet --upgrade pip
# shellcheck disable=SC2086
"$VPY" -m pip install --quiet -c build/oldest/constraints.txt $OLDEST_SPEC

# Plain `pip install -e .` (pip's isolated build, as a user types it): the build backend compiles
# against this environment's torch, and no second torch may be downloaded (checked in the log).
log "building fanet_kernels (C++ CPU kernels only) in $SRC with a plain pip install -e ."
(cd "$SRC" && FANET_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} "$VPY" -m pip install -v \
   -c ../constraints.txt -e ".[triton,test]" > ../build.log 2>&1) || { tail -50 build/oldest/build.log; exit 1; }
if grep -Eq "(Collecting|Downloading) torch[-=]" build/oldest/build.log; then
  grep -E "(Collecting|Downloading) torch[-=]" build/oldest/build.log
  echo "oldest-env: the isolated build fetched a second torch" >&2; exit 1
fi

cd "$SRC"
TRITON_INTERPRET=1 "$VPY" - <<'EOF'
import os, platform, re, sys, tomllib

import numpy, torch, triton

import fanet_kernels as fk

print(f"oldest-env: python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, numpy {numpy.__version__}")
here = os.path.realpath("fanet_kernels")
if not os.path.realpath(fk.__file__).startswith(here + os.sep):
    sys.exit(f"oldest-env: fanet_kernels imported from {fk.__file__}, not from the copy in {here}")
backends = fk.available_backends("cpu")
if not {"cpu", "triton"} <= set(backends):
    sys.exit(f"oldest-env: the cpu and triton backends must both run on CPU tensors here, got {backends}")
# pyproject.toml's lower bounds must be the versions tested here.
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
installed = {"torch": torch.__version__, "triton": triton.__version__}
for name, version in installed.items():
    bounds = [m.group(1) for r in reqs if (m := re.fullmatch(rf"{name}\s*>=\s*([\d.]+)", r.strip()))]
    release = version.split("+")[0]
    if len(bounds) != 1 or not (release + ".").startswith(bounds[0] + "."):
        sys.exit(f"oldest-env: pyproject.toml must claim {name}>=X with X the tested {release} "
                 f"(e.g. {name}>={'.'.join(release.split('.')[:2])}); it claims {bounds or 'no lower bound'}")
EOF

OP_TESTS="tests/test_gate.py tests/test_residual.py tests/test_bn_gate.py tests/test_focus.py tests/test_cpu_dispatch.py"
log "tests: pytest $OP_TESTS -m 'not cuda'"
# Any non-zero exit fails the step, 5 ("no tests collected") included.
# The filter: triton 3.6's interpreter warns once per int() of a 1-element array (tens of thousands).
# shellcheck disable=SC2086
"$VPY" -m pytest $OP_TESTS -m "not cuda" -q -p no:cacheprovider \
  -W "ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"
log "passed"
if [ "${OLDEST_CLEANUP:-0}" = 1 ]; then
  rm -rf "$VENV" "$WORK"
  log "deleted $VENV and $WORK"
fi
