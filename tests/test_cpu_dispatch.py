"""The CPU kernels' SIMD levels (csrc/cpu/dispatch.cpp): the extension holds every level and runs the best
one this CPU runs, or FANET_CPU_CAPABILITY's.  Each level this machine runs must give the default level's
results: bit for bit where the arithmetic is element-wise (-ffp-contract=off, the same rounding on every
level) and wherever levels share a vector width (default and avx2: 8 floats; avx512 and avx512bf16: 16),
to rounding in the sums (pools, grad_k, batch statistics, weight gradients) and what is computed from them
between widths, whose lanes split a sum differently.  And no code outside a level's namespace may use
AVX: a torch header's inline function compiled for AVX-512 and linked for everyone would crash an
older CPU."""
from __future__ import annotations

import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

# The extension alone, loaded without the package (which also loads Triton and the Python backends):
# the subprocesses below start faster so, and this file tests the library only.
_PACKAGE = importlib.util.find_spec("fanet_kernels").submodule_search_locations[0]
_SO = next(iter(sorted(glob.glob(os.path.join(_PACKAGE, "_C*.so")) + glob.glob(os.path.join(_PACKAGE, "_C*.pyd")))),
           None)
if _SO is None:
    pytest.skip("fanet_kernels._C is not built", allow_module_level=True)
_LOAD = f"""
import importlib.util, torch
_spec = importlib.util.spec_from_file_location("fanet_kernels._C", {_SO!r})
c = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(c)
"""
_C = {}
exec(_LOAD, _C)
_C = _C["c"]

LEVELS = ("default", "avx2", "avx512", "avx512bf16")  # lowest first; a build on x86-64 holds them all
WIDTH = {"default": 8, "avx2": 8, "avx512": 16, "avx512bf16": 16}  # float lanes of the level's vectors
X86 = platform.machine() in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def _levels_this_cpu_runs() -> list[str]:
    """From /proc/cpuinfo, which lists only what the kernel lets programs use (the OS side of AVX)."""
    flags = _cpu_flags()
    runs = ["default"]
    if X86 and {"avx2", "fma", "f16c"} <= flags:
        runs.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            runs.append("avx512")
            if "avx512_bf16" in flags:
                runs.append("avx512bf16")
    return runs


def _run(code: str, level: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FANET_CPU_CAPABILITY"}
    if level is not None:
        env["FANET_CPU_CAPABILITY"] = level
    return subprocess.run([sys.executable, "-c", _LOAD + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not X86 or not os.path.exists("/proc/cpuinfo"), reason="needs x86-64 Linux (/proc/cpuinfo)")
def test_the_level_in_use_is_the_best_this_cpu_runs():
    expected = _levels_this_cpu_runs()
    assert list(_C.cpu_capabilities()) == expected
    r = _run("print(c.cpu_capability())", None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == expected[-1]


# Every op of the extension, forward and backward, in each dtype and layout, on small odd shapes: C = 5
# and 37 (masked steps), 16 (channels_last rows shorter than a step), 300 (two channel blocks).
_OUTPUTS = r"""
import sys
ops = torch.ops.fanet
torch.manual_seed(0)
results = {}

def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]

def record(name, outs, inputs, grads_of):
    # outs: the op's outputs; the loss weights each by a fixed random tensor so every gradient is non-trivial
    loss = sum((o.double() * torch.randn(o.shape, dtype=torch.double)).sum() for o in grads_of)
    loss.backward()
    for i, o in enumerate(outs):
        results[f"{name} out{i}"] = o.detach()
    for i, t in enumerate(inputs):
        results[f"{name} grad{i}"] = t.grad

for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for shape in ((3, 5, 7, 9), (2, 16, 5, 3), (2, 37, 3, 5), (1, 300, 2, 3)):
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            tag = f"{dtype} {shape} {'channels_last' if cl else 'nchw'}"
            N, C = shape[:2]
            x, u = (torch.randn(shape).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
            k = torch.rand(N, dtype=acc)
            xs = leaves(x, u, k)
            o = ops.gate(*xs)
            record("gate " + tag, [o], xs, [o])
            for op in ("gate_pool", "residual_gate_pool"):
                xs = leaves(x, u, k)
                outs = getattr(ops, op)(*xs)
                record(f"{op} {tag}", outs, xs, outs)
            w, b = torch.randn(C, dtype=acc), torch.randn(C, dtype=acc)
            rm, rv = torch.randn(C, dtype=acc), torch.rand(C, dtype=acc) + 0.5
            for training in (True, False):
                xs = leaves(x, u, k, w, b)
                outs = ops.bn_residual_gate_pool(*xs, rm, rv, training, 1e-5)
                record(f"bn_residual_gate_pool training={training} {tag}", outs, xs, outs[:2])
            w1, b1 = torch.randn(9, C, dtype=dtype) * 0.3, torch.randn(9, dtype=dtype) * 0.1
            w2, b2 = torch.randn(1, 9, dtype=dtype) * 0.3, torch.randn(1, dtype=dtype)
            xs = leaves(x, w1, b1, w2, b2)
            kf = ops.focus(*xs)
            record("focus " + tag, [kf], xs, [kf])
        xs = leaves(torch.randn(shape[0] * 3, shape[1]).to(dtype), w1, b1, w2, b2)
        km = ops.mlp(*xs)
        record(f"mlp {dtype} {shape}", [km], xs, [km])
torch.save({"level": c.cpu_capability(), "results": results}, sys.argv[1] if len(sys.argv) > 1 else "-")
"""

# Outputs that are sums, or computed from sums (those may differ by rounding between vector widths).
_FROM_SUMS = re.compile(r"^(gate|gate_pool|residual_gate_pool) .* (out1|grad2)$"  # pooled, grad_k
                        r"|^bn_residual_gate_pool training=True "  # batch statistics reach every output
                        r"|^bn_residual_gate_pool training=False .* (out1|grad2|grad3|grad4)$"
                        r"|^focus ")  # the pool reaches k and every gradient
_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{level: {name: tensor}} for every level this build holds and this CPU runs."""
    out = {}
    for level in _C.cpu_capabilities():
        path = tmp_path_factory.mktemp("levels") / f"{level}.pt"
        r = subprocess.run([sys.executable, "-c", _LOAD + _OUTPUTS, str(path)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "FANET_CPU_CAPABILITY": level})
        assert r.returncode == 0, r.stderr[-3000:]
        saved = torch.load(path)
        assert saved["level"] == level
        out[level] = saved["results"]
    return out


@pytest.mark.parametrize("level", LEVELS[1:])
def test_each_level_gives_the_default_levels_results(outputs, level):
    if level not in outputs:
        pytest.skip(f"this CPU or build does not run the {level} level")
    ref, got = outputs["default"], outputs[level]
    assert got.keys() == ref.keys()
    same_width = WIDTH[level] == WIDTH["default"]
    for name, r in ref.items():
        g = got[name]
        if same_width or not _FROM_SUMS.search(name):
            assert torch.equal(g, r), f"{level}: {name} differs from the default level's"
        else:
            tol = _RTOL[r.dtype] * max(1.0, r.double().abs().max().item())
            torch.testing.assert_close(g, r, rtol=_RTOL[r.dtype], atol=tol, msg=lambda m: f"{level}: {name}: {m}")


def test_levels_of_one_width_agree_bit_for_bit(outputs):
    pairs = [(a, b) for a, b in (("default", "avx2"), ("avx512", "avx512bf16")) if a in outputs and b in outputs]
    if not pairs:
        pytest.skip("this CPU runs no two levels of the same vector width")
    for a, b in pairs:
        for name, r in outputs[a].items():
            assert torch.equal(outputs[b][name], r), f"{b}: {name} differs from {a}'s"


def test_an_unknown_level_is_a_clear_error():
    r = _run("""
        try:
            c.cpu_capability()
        except ValueError as e:
            print("capability:", e)
        try:
            torch.ops.fanet.gate(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.ones(1))
        except ValueError as e:
            print("op:", e)
        """, "avx9")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["capability", "op"]
    for line in lines:
        assert "FANET_CPU_CAPABILITY=avx9" in line and "allowed: default" in line, line


def test_a_level_this_cpu_cannot_run_is_a_clear_error():
    missing = [level for level in LEVELS if level not in _levels_this_cpu_runs()] if X86 else ["avx2"]
    if not missing:
        pytest.skip("this CPU runs every level")
    r = _run("c.cpu_capability()", missing[-1])
    assert r.returncode != 0
    assert "ValueError" in r.stderr and f"FANET_CPU_CAPABILITY={missing[-1]}" in r.stderr, r.stderr


def _functions_using_avx(so: str) -> dict[str, set[str]]:
    """{demangled function: AVX mnemonics or registers it uses} for every function of the library's code."""
    dump = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-j", ".text", so], capture_output=True,
                          text=True, check=True).stdout
    found: dict[str, set[str]] = {}
    name = None
    for line in dump.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            continue
        parts = line.split("\t")
        if name is None or len(parts) < 2:
            continue
        insn = parts[1].strip()
        mnemonic = insn.split()[0] if insn else ""
        # VEX/EVEX instructions all start with v (vmovaps, vfmadd231ps, vzeroupper); k*: AVX-512 masks.
        if (mnemonic.startswith("v") or re.match(r"k(mov|and|or|xor|not|test|shift|unpck|add)", mnemonic)
                or re.search(r"%[yz]mm\d", insn)):
            found.setdefault(name, set()).add(mnemonic)
    return found


@pytest.mark.skipif(not X86, reason="the SIMD levels are x86-64's")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_no_code_outside_a_simd_level_uses_avx():
    found = _functions_using_avx(_SO)
    # The level's namespace, demangled, or mangled where objdump cannot demangle (OpenMP's outlined
    # "..._omp_fn.0" copies): 4AVX2, 6AVX512, 10AVX512BF16 (length-prefixed names).
    levels = re.compile(r"::(AVX2|AVX512|AVX512BF16)::|(4AVX2|6AVX512|10AVX512BF16)(?=[0-9EIN])")
    assert any("::AVX512::" in f for f in found), "no AVX-512 code found: is objdump reading the library?"
    assert any("fanet::cpu::AVX2::" in f for f in found), "no AVX2 kernel found"
    outside = sorted(f for f in found if not levels.search(f))
    assert not outside, "functions outside the AVX2/AVX512 namespaces use AVX instructions:\n" + "\n".join(
        f"{f}: {sorted(found[f])[:5]}" for f in outside[:20])
