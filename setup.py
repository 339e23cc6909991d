"""Builds fanet_kernels._C (C++ CPU kernels, and CUDA kernels when they can be built).

Environment flags (in the style of flash-attention's setup.py):
  FANET_CUDA=auto|0|1     auto (default): build the CUDA sources when nvcc is found and the
                          installed torch was built with CUDA; 1: require it; 0: skip it.
                          Decided without torch.cuda.is_available(): a GPU is not needed to build.
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "7.5;8.0;9.0+PTX": machine code for sm_75 (T4),
                          sm_80 (A100, and sm_86/sm_89 GPUs) and sm_90 (H100/H200), and sm_90's PTX,
                          which the driver compiles for newer GPUs.  The extension records the list
                          (fanet_kernels._C.cuda_archs()); backend 'cuda' refuses a GPU it does not cover.
  FANET_CPU_ISA=auto|avx512bf16|avx512|avx2|generic
                          SIMD width of the CPU kernels; auto picks what this machine's CPU has
                          (avx512bf16: AVX-512 with the BF16 conversion instructions).
  FANET_PTXAS_VERBOSE=1   print ptxas register/spill reports for every CUDA kernel.
  MAX_JOBS                parallel compile jobs (ninja), honoured by torch's BuildExtension.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shutil
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower()


def _cpu_isa() -> str:
    isa = _env("FANET_CPU_ISA", "auto")
    if isa not in ("auto", *CPU_ISA_FLAGS):
        sys.exit(f"setup.py: FANET_CPU_ISA must be auto, {', '.join(CPU_ISA_FLAGS)}, got {isa!r}")
    if isa != "auto":
        return isa
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "generic"
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"} <= flags:
        return "avx512bf16" if "avx512_bf16" in flags else "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "generic"


# ATen's Vectorized<T> picks its SIMD implementation from CPU_CAPABILITY_* macros (it is
# header-only), so defining them with the matching -m flags gives real AVX2/AVX-512 lanes.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
           "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
CPU_ISA_FLAGS = {
    "avx512bf16": _AVX512 + ["-mavx512bf16"],  # bfloat16 rounding in one instruction (fa_cpu.cpp)
    "avx512": _AVX512,
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "generic": [],
}


def _cuda_arch_module():
    """fanet_kernels/cuda_arch.py, loaded alone: importing the package would import the extension."""
    path = os.path.join(ROOT, "fanet_kernels", "cuda_arch.py")
    spec = importlib.util.spec_from_file_location("_fanet_cuda_arch", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _built_archs(cpp_extension, cuda_arch) -> str:
    """The arch list nvcc is given, as "7.5:8.0:9.0+PTX" (colons: the compile definition passes
    through the shell, ninja and nvcc, which splits -D values at commas); "" if unknown."""
    try:  # torch's own -gencode flags for TORCH_CUDA_ARCH_LIST (named arches expanded)
        archs = cuda_arch.from_gencode_flags(cpp_extension._get_cuda_arch_flags())
    except AttributeError:  # a torch without the helper
        archs = ()
    if not archs:
        try:
            archs = cuda_arch.parse_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
        except ValueError:
            return ""
    return cuda_arch.format_arch_list(archs, ":")


def _want_cuda(torch_mod) -> bool:
    from torch.utils import cpp_extension

    flag = _env("FANET_CUDA", "auto")
    if flag not in ("auto", "0", "1"):
        sys.exit(f"setup.py: FANET_CUDA must be auto, 0 or 1, got {flag!r}")
    if flag == "0":
        return False
    nvcc = cpp_extension.CUDA_HOME and os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    has = bool(nvcc) and torch_mod.version.cuda is not None
    if flag == "1" and not has:
        sys.exit("setup.py: FANET_CUDA=1 but nvcc was not found (set CUDA_HOME) "
                 "or the installed torch has no CUDA (torch.version.cuda is None)")
    return has


def _extensions():
    if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("setup.py: torch is not importable in this build environment. Install torch first, "
                 "then build against it with `pip install -e . --no-build-isolation` (see README).")

    with_cuda = _want_cuda(torch)
    isa = _cpu_isa()
    sources = ["csrc/fanet.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` (torch's OpenMP backend);
    # without it every CPU kernel runs on one thread.  torch ships libgomp.so.1, which the
    # extension then shares.
    # -ffp-contract=off: GCC would fuse a * b + c into one FMA where -mfma allows (its default outside
    # ISO C), nvcc does where --fmad=false does not forbid it: both devices round every operation
    # as written, and fuse only where fa_math.h asks (Lane::fmadd), so their element-wise results agree.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DFANET_PYTHON_MODULE", "-Wall",
           "-Wno-unused-function", "-Wno-unknown-pragmas"] + CPU_ISA_FLAGS[isa]
    extra = {"cxx": cxx}
    ext_cls = cpp_extension.CppExtension
    if with_cuda:
        cuda_arch = _cuda_arch_module()
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cuda_arch.DEFAULT_ARCH_LIST)
        archs = _built_archs(cpp_extension, cuda_arch)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "-std=c++20", "-DFANET_WITH_CUDA", "--expt-relaxed-constexpr", "-lineinfo",
                "--fmad=false", "-Xcompiler=-ffp-contract=off",  # no contraction, as in the CPU build
                # host-side warnings of the .cu files too (.ci/cuda_check.sh fails on ours)
                "-Xcompiler=-Wall"]
        if archs:
            nvcc.append(f"-DFANET_CUDA_ARCHS={archs}")
            cxx.append(f"-DFANET_CUDA_ARCHS={archs}")
        if _env("FANET_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
        extra["nvcc"] = nvcc
        cxx.append("-DFANET_WITH_CUDA")
        ext_cls = cpp_extension.CUDAExtension
    print(f"fanet_kernels: building _C for CPU ({isa})"
          + (f" and CUDA (arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else " only"),
          file=sys.stderr)
    return [ext_cls("fanet_kernels._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                    include_dirs=[os.path.join(ROOT, "csrc")])], cpp_extension.BuildExtension


def _timed(build_ext):
    """build_ext that prints the wall time of each extension and, from ninja's log, of each source
    (CI reports the CUDA compile time from the line of csrc/cuda/fa_cuda.cu)."""

    class TimedBuild(build_ext):
        def build_extension(self, ext):
            start = time.time()
            super().build_extension(ext)
            print(f"fanet_kernels: built {ext.name} in {time.time() - start:.0f} s", file=sys.stderr)
            took: dict[str, float] = {}  # object -> seconds, its last entry (the log is appended to)
            for log in glob.glob(os.path.join(self.build_temp, "**", ".ninja_log"), recursive=True):
                with open(log) as f:
                    for line in f:
                        begin_ms, end_ms, _, obj, *rest = line.rstrip("\n").split("\t") + [""] * 4
                        if begin_ms.isdigit() and end_ms.isdigit():
                            took[os.path.join(os.path.dirname(log), obj)] = (int(end_ms) - int(begin_ms)) / 1000
            for path, seconds in took.items():
                if os.path.exists(path) and os.path.getmtime(path) >= start - 1:  # compiled by this build
                    print(f"fanet_kernels: compiled {os.path.relpath(path, self.build_temp)} in {seconds:.0f} s",
                          file=sys.stderr)

    return TimedBuild


def main() -> None:
    ext_modules, build_ext = _extensions()
    setup(
        packages=find_packages(include=["fanet_kernels", "fanet_kernels.*"]),
        package_data={"fanet_kernels": ["py.typed"]},  # the inline type hints are public (PEP 561)
        ext_modules=ext_modules,
        cmdclass={"build_ext": _timed(build_ext.with_options(use_ninja=shutil.which("ninja") is not None))},
    )


if __name__ == "__main__":
    main()
