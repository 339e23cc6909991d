"""Which GPUs a CUDA build runs on (fanet_kernels/cuda_arch.py), and that the dispatch refuses or skips
the cuda backend on a GPU its build does not cover.  No GPU needed: capabilities are passed in, or
torch.cuda's queries are replaced."""
from __future__ import annotations

import os
import re

import pytest
import torch

from fanet_kernels import backends, cuda_arch, native, ops
from fanet_kernels.cuda_arch import DEFAULT_ARCH_LIST, Arch, from_gencode_flags, parse_arch_list, runs_on

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the arch list ----------------------------------------------------------------------------
def test_parse_and_format():
    archs = parse_arch_list("7.5;8.0;9.0+PTX")
    assert archs == (Arch(7, 5), Arch(8, 0), Arch(9, 0, ptx=True))
    assert cuda_arch.format_arch_list(archs) == "7.5;8.0;9.0+PTX"
    assert cuda_arch.format_arch_list(archs, ":") == "7.5:8.0:9.0+PTX"
    for text in ("7.5 8.0 9.0+PTX", "7.5,8.0,9.0+ptx", "7.5:8.0:9.0+PTX", " 7.5; 8.0 ;9.0+PTX; "):
        assert parse_arch_list(text) == archs, text
    assert parse_arch_list("9.0a;10.0f;12.1+PTX") == (Arch(9, 0, "a"), Arch(10, 0, "f"), Arch(12, 1, ptx=True))
    assert parse_arch_list("") == ()


@pytest.mark.parametrize("bad", ["Ampere", "8", "8.0+SASS", "sm_80", "8.10"])
def test_parse_names_the_bad_entry(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_arch_list(f"7.5;{bad}")


def test_from_gencode_flags():
    """torch's BuildExtension flags for "7.5;8.0;9.0+PTX", and nvcc's bracketed form."""
    flags = ["-gencode=arch=compute_75,code=sm_75", "-gencode=arch=compute_80,code=sm_80",
             "-gencode=arch=compute_90,code=compute_90", "-gencode=arch=compute_90,code=sm_90"]
    assert cuda_arch.format_arch_list(from_gencode_flags(flags)) == DEFAULT_ARCH_LIST
    assert from_gencode_flags(["-gencode", "arch=compute_100a,code=[sm_100a,compute_100a]"]) == \
        (Arch(10, 0, "a", ptx=True),)
    assert from_gencode_flags(["-O3", "--fmad=false"]) == ()


# ---- the CUDA rule: SASS X.Y runs on X.Z, Z >= Y; PTX X.Y on any capability >= X.Y -----------
DEFAULT_RUNS = {(7, 5): True, (8, 0): True, (8, 6): True, (8, 7): True, (8, 9): True, (9, 0): True,
                (10, 0): True, (12, 0): True,  # sm_90's PTX, compiled by the driver
                (7, 0): False, (7, 2): False, (6, 1): False}


@pytest.mark.parametrize("cc", list(DEFAULT_RUNS), ids=lambda cc: f"{cc[0]}.{cc[1]}")
def test_default_build_runs_on(cc):
    assert runs_on(parse_arch_list(DEFAULT_ARCH_LIST), cc) is DEFAULT_RUNS[cc]


@pytest.mark.parametrize("arch_list, cc, runs", [
    ("8.0;9.0", (10, 0), False),     # SASS only: no newer major
    ("8.0;9.0", (8, 6), True),       # sm_80 SASS on 8.6
    ("8.6", (8, 0), False),          # not on a lower minor
    ("8.6+PTX", (8, 0), False),      # nor its PTX
    ("8.6+PTX", (9, 0), True),
    ("9.0a", (9, 0), True),          # arch-specific: that capability only
    ("9.0a+PTX", (10, 0), False),
    ("10.0f", (10, 3), True),        # family: same major
    ("10.0f", (12, 0), False),
])
def test_rule(arch_list, cc, runs):
    assert runs_on(parse_arch_list(arch_list), cc) is runs


def test_unsupported_reason_names_gpu_capability_and_archs():
    assert cuda_arch.unsupported_reason(DEFAULT_ARCH_LIST, (8, 6), "NVIDIA GeForce RTX 3090") is None
    reason = cuda_arch.unsupported_reason(DEFAULT_ARCH_LIST, (7, 0), "Tesla V100-SXM2-16GB")
    assert "Tesla V100-SXM2-16GB" in reason and "compute capability 7.0" in reason
    assert DEFAULT_ARCH_LIST in reason and "triton" in reason
    # a list that does not parse (a CMake build for "all") is left to the kernels' own check
    assert cuda_arch.unsupported_reason("all", (7, 0), "Tesla V100-SXM2-16GB") is None


def test_defaults_agree():
    """setup.py takes its default from cuda_arch; CMake's default is the same list."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert 'setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch.DEFAULT_ARCH_LIST)' in f.read()
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    assert 'set(CMAKE_CUDA_ARCHITECTURES "75-real;80-real;90")' in cmake  # 90: SASS and PTX
    assert f'"{DEFAULT_ARCH_LIST}"' in cmake


@pytest.mark.skipif(not native.HAS_EXTENSION or native.extension.cuda_archs() is None, reason="no CUDA kernels built")
def test_extension_records_its_archs():
    archs = parse_arch_list(native.extension.cuda_archs())
    assert archs, "the build recorded no CUDA archs"
    assert backends.load("cuda").device_check is not None


# ---- the dispatch, with torch.cuda's device queries replaced ----------------------------------
GPUS = {0: ("NVIDIA H200", (9, 0)), 1: ("Tesla V100-SXM2-16GB", (7, 0)), 2: ("Tesla T4", (7, 5))}


def _fake(name: str) -> backends.Backend:
    def op(*args):
        raise AssertionError("not called")

    check = cuda_arch.device_check(DEFAULT_ARCH_LIST) if name == "cuda" else None
    return backends.Backend(name=name, devices=("cuda",), gate=op, gate_pool=op, focus=op, residual_gate_pool=op,
                            mlp=op, device_check=check)


@pytest.fixture
def gpus(monkeypatch):
    """Three GPUs of GPUS, device 1 current; cuda and triton backends that run on CUDA tensors
    (fakes, the cuda one with the device check of a default build).  Yields the query counts."""
    asked = {"capability": 0}

    def capability(device=None):
        asked["capability"] += 1
        return GPUS[device][1]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPUS[device][0])
    monkeypatch.setitem(backends._registered, "cuda", _fake("cuda"))
    monkeypatch.setitem(backends._registered, "triton", _fake("triton"))
    yield asked


def test_named_cuda_backend_refuses_an_uncovered_gpu(gpus):
    with pytest.raises(RuntimeError, match=r"Tesla V100-SXM2-16GB \(compute capability 7\.0\).*7\.5;8\.0;9\.0\+PTX"):
        backends.resolve("cuda", torch.device("cuda", 1))
    with pytest.raises(RuntimeError, match="Tesla V100"):
        backends.resolve("cuda", torch.device("cuda"))  # no index: the current device
    assert backends.resolve("cuda", torch.device("cuda", 0)).name == "cuda"
    assert backends.resolve("cuda", torch.device("cuda", 2)).name == "cuda"  # T4: sm_75


def test_auto_skips_cuda_on_an_uncovered_gpu(gpus, monkeypatch):
    dev = torch.device("cuda", 1)
    assert backends.resolve("auto", dev).name == "triton"
    monkeypatch.delitem(backends._registered, "triton")  # no Triton: the reference serves it
    monkeypatch.setitem(backends._errors, "triton", "ImportError: no triton")
    assert backends.resolve("auto", dev).name == "reference"
    assert backends.resolve("auto", torch.device("cuda", 0)).name == "cuda"
    assert "cuda" not in backends.available_backends(dev)
    assert "cuda" in backends.available_backends(torch.device("cuda", 0))


def test_the_check_asks_once_per_device(gpus):
    for _ in range(3):
        for index in (0, 1, 2):
            try:
                backends.resolve("cuda", torch.device("cuda", index))
            except RuntimeError:
                pass
    assert gpus["capability"] == 3


def test_an_op_call_refuses_before_any_kernel(gpus):
    """ops.gate asks the dispatch first: the fake cuda op (which raises AssertionError) is never
    reached.  A CPU tensor posing as cuda:1 would be refused just the same; the device is what counts."""
    x = torch.zeros(1, 1, 1, 1)
    real = backends.resolve

    def on_cuda1(name, device):
        return real(name, torch.device("cuda", 1))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(backends, "resolve", on_cuda1)
        with pytest.raises(RuntimeError, match="Tesla V100"):
            ops.gate(x, x, torch.zeros(1), backend="cuda")


def test_under_compile_the_check_only_reads_what_eager_calls_found(gpus, monkeypatch):
    """Dynamo traces resolve(): the check asks torch.cuda nothing there, it reuses eager's answers."""
    check = backends._registered["cuda"].device_check
    assert check(torch.device("cuda", 1)) is not None  # eager: asked and remembered
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert "Tesla V100" in check(torch.device("cuda", 1))
    assert check(torch.device("cuda", 2)) is None  # never asked eagerly: left to the kernels' check
    assert gpus["capability"] == 1
