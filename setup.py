"""Builds fanet_kernels._C (C++ CPU kernels, and CUDA kernels when they can be built).

Environment flags (in the style of flash-attention's setup.py):
  FANET_CUDA=auto|0|1     auto (default): build the CUDA sources when nvcc is found and the
                          installed torch was built with CUDA; 1: require it; 0: skip it.
                          Decided without torch.cuda.is_available(): a GPU is not needed to build.
  TORCH_CUDA_ARCH_LIST    CUDA architectures; default "7.5;8.0;9.0+PTX": machine code for sm_75 (T4),
                          sm_80 (A100, and sm_86/sm_89 GPUs) and sm_90 (H100/H200), and sm_90's PTX,
                          which the driver compiles for newer GPUs.  The extension records the list
                          (fanet_kernels._C.cuda_archs()); backend 'cuda' refuses a GPU it does not cover.
  FANET_CPU_CAPABILITIES=all|<list>
                          The SIMD levels the CPU kernels are compiled for, as a comma-separated list
                          of avx2, avx512, avx512bf16 (default: all of them on x86-64; other machines
                          build only the default level).  Every build holds the default level (no
                          SIMD flags); at run time the extension uses the best level this CPU runs
                          (or FANET_CPU_CAPABILITY's), so one build runs on every x86-64 CPU.  A shorter
                          list only makes a quicker build, for development.
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


# The SIMD levels of the CPU kernels (csrc/cpu/dispatch.cpp picks one at run time), as ATen compiles
# its own: each level's flags, and CPU_CAPABILITY, which names the namespace its code lives in (ours
# and at::vec's).  ATen's Vectorized<T> picks its SIMD implementation from the CPU_CAPABILITY_AVX2 /
# _AVX512 macros (it is header-only), so they give real AVX2/AVX-512 lanes.  The AVX512BF16 level is
# AVX512's plus one instruction that rounds float to bfloat16 (csrc/cpu/walks.h): it holds only the
# bfloat16 kernels, and needs the AVX512 level for the other dtypes.
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX512"]
CPU_LEVEL_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": _AVX512 + ["-DCPU_CAPABILITY=AVX512"],
    "avx512bf16": _AVX512 + ["-mavx512bf16", "-DCPU_CAPABILITY=AVX512BF16", "-DCPU_CAPABILITY_AVX512BF16"],
}


def _cpu_levels() -> list[str]:
    """The SIMD levels to compile, default first (see FANET_CPU_CAPABILITIES)."""
    if "FANET_CPU_ISA" in os.environ:
        print("fanet_kernels: FANET_CPU_ISA is ignored: every SIMD level is compiled and the best one that "
              "the CPU runs is picked at run time (FANET_CPU_CAPABILITIES restricts the levels built)",
              file=sys.stderr)
    if platform.machine() not in ("x86_64", "AMD64"):
        return ["default"]
    simd = [level for level in CPU_LEVEL_FLAGS if level != "default"]
    flag = _env("FANET_CPU_CAPABILITIES", "all")
    asked = list(simd) if flag == "all" else [v.strip() for v in flag.split(",") if v.strip() not in ("", "default")]
    if any(level not in simd for level in asked):
        sys.exit(f"setup.py: FANET_CPU_CAPABILITIES must be all or a comma-separated list of {', '.join(simd)}, "
                 f"got {flag!r}")
    if "avx512bf16" in asked:
        asked.append("avx512")
    return ["default"] + [level for level in simd if level in asked]


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
    levels = _cpu_levels()
    sources = ["csrc/fanet.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` (torch's OpenMP backend);
    # without it every CPU kernel runs on one thread.  torch ships libgomp.so.1, which the
    # extension then shares.
    # -ffp-contract=off: GCC would fuse a * b + c into one FMA where -mfma allows (its default outside
    # ISO C), nvcc does where --fmad=false does not forbid it: both devices round every operation
    # as written, and fuse only where fa_math.h asks (Primitives::fmadd), so their element-wise results agree.
    # -Wno-psabi: GCC notes that 32-byte vectors passed by value (the default level's) change ABI with
    # -mavx; they never cross a level's boundary.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-DFANET_PYTHON_MODULE", "-Wall",
           "-Wno-unused-function", "-Wno-unknown-pragmas", "-Wno-psabi"]
    cxx += [f"-DFANET_CPU_{level.upper()}" for level in levels[1:]]  # the levels dispatch.cpp may pick
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
    print(f"fanet_kernels: building _C for CPU (SIMD levels {', '.join(levels)})"
          + (f" and CUDA (arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else " only"),
          file=sys.stderr)
    ext = ext_cls("fanet_kernels._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(ROOT, "csrc")])
    # The kernels of each level: csrc/cpu/capability/<family>_<level>.cpp, compiled by _level_build.
    ext.cpu_levels = {level: sorted(glob.glob(f"csrc/cpu/capability/*_{level}.cpp")) for level in levels}
    return [ext], _level_build(cpp_extension.BuildExtension)


def _level_build(build_ext):
    """build_ext that first compiles each SIMD level's kernel sources (ext.cpu_levels) with that level's
    flags (CPU_LEVEL_FLAGS) added to the extension's own, one compile call per level (torch's ninja
    build takes one set of flags per call), then links their objects after the other sources',
    the default level's first.  Order matters: an inline function of a torch header that several
    objects define is taken from the first object that has it, which is then one compiled without
    SIMD flags (host code, or the default level), not an AVX-512 one that an older CPU cannot run.
    tests/test_cpu_dispatch.py checks the linked library for that."""

    class LevelBuild(build_ext):
        def build_extension(self, ext):
            levels = getattr(ext, "cpu_levels", {})
            objects = []
            for level, level_sources in levels.items():
                if not level_sources:
                    continue
                extra = dict(ext.extra_compile_args)
                extra["cxx"] = list(extra["cxx"]) + CPU_LEVEL_FLAGS[level]
                objects += self.compiler.compile(level_sources, output_dir=self.build_temp, macros=ext.define_macros,
                                                 include_dirs=ext.include_dirs, debug=self.debug,
                                                 extra_postargs=extra, depends=ext.depends)
            ext.extra_objects = objects + [o for o in ext.extra_objects if o not in objects]
            super().build_extension(ext)

    return LevelBuild


def _timed(build_ext):
    """build_ext that prints the wall time of each extension and, from ninja's log, of each source
    (CI reports the CUDA compile time from the lines of csrc/cuda/*.cu)."""

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
