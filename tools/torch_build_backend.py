"""PEP 517 build backend: setuptools' own, plus the torch of the environment being installed into.

fanet_kernels._C must be compiled against the torch it will run with.  pip builds in an isolated
environment that holds only pyproject.toml's build requirements, and listing torch there would
download and compile against a second torch (of pip's choosing, several GB).  The environment being
installed into is still findable: pip runs this backend with that environment's interpreter and
hides its site-packages only through PYTHONPATH/PYTHONNOUSERSITE and a sitecustomize.  So this
backend asks that interpreter, without them, where its torch is, and appends that site-packages to
sys.path (after the isolated environment's, whose setuptools and wheel stay the ones in use).
With ``--no-build-isolation`` torch is importable already and nothing is added.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from setuptools.build_meta import *  # noqa: F401,F403  (setuptools' hooks, unchanged)

_PROBE = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"


def _installed_torch_site() -> str | None:
    """site-packages of the target environment's torch, or None if it has none."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                             timeout=300, cwd=os.path.expanduser("~"))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else None


def _add_installed_torch() -> None:
    if importlib.util.find_spec("torch") is not None:
        return  # --no-build-isolation, or torch among the build requirements
    site = _installed_torch_site()
    if site is not None:  # else setup.py says to install torch first
        sys.path.append(site)


# Every hook (pip runs each in a fresh process) may run setup.py, which imports torch.
_add_installed_torch()
