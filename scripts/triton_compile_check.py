#!/usr/bin/env python3
"""Compiles the Triton kernels of fanet_kernels.triton for real GPUs, with no GPU or driver, and
checks their register use: no compile error, no spill, at most 128 registers per thread.

The interpreter that the tests run the kernels under cannot see register pressure, spills or
lowering errors.  This script records every launch the op code makes over a spread of shapes
(FULL_SHAPES), the four dtypes, both layouts and every mode, by running the ops' launch code on
meta tensors (no data, any size) with Triton's launch entry points replaced by a recorder: the
launch heuristic itself (pool_config, flat_config, warps_for, mlp_config, need_int64) decides the
constexprs and num_warps, and for autotuned kernels the configs a GPU would try.  Each launch also
comes with int64 offsets.  A representative set of the distinct launches (see select()) is then
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for each
architecture in a process pool; Triton's bundled ptxas reports registers and spills (-v).

Exit status: 0 when every compile succeeds with no spill and at most --max-registers registers per
thread; 1 otherwise (the table marks each failing row); 2 on a usage error.

    .venv/bin/python scripts/triton_compile_check.py [--arch 75 90] [--quick] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

# The interpreter would replace every kernel by its numpy simulation: compiling needs the real JIT.
os.environ.pop("TRITON_INTERPRET", None)
# Every compile runs ptxas (a private cache below, and no reuse) and prints its -v log, which we capture.
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
_CACHE = tempfile.TemporaryDirectory(prefix="fanet-triton-aot-")
os.environ["TRITON_CACHE_DIR"] = _CACHE.name

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import fanet_kernels  # noqa: E402,F401  (before the patched import below: nothing else sees the patch)

# Kernels are autotuned only when a driver is present (common.AUTOTUNE, read at import): pretend one
# is while fanet_kernels.triton is imported, so that autotuned kernels carry the configs a GPU
# compiles.  Nothing else runs in between.
_is_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True
try:
    from fanet_kernels.triton import bn_gate, common, focus, gate  # noqa: E402
finally:
    torch.cuda.is_available = _is_available

MODULES = (common, gate, bn_gate, focus)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
MAX_REGISTERS = 128


# ---- recording launches -----------------------------------------------------------------------
@dataclass
class Launch:
    """One distinct compile: a kernel with its signature, constexprs and options."""
    kernel: str                     # module:name of the jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]      # tl.dtype values as "tl.<name>" ("tl.fp32")
    options: dict[str, Any]
    calls: int = 0                  # op calls that made this launch
    dtypes: list[str] = field(default_factory=list)  # the op inputs' dtypes it was launched for
    example: str = ""               # the first op call that made it

    def key(self) -> tuple:
        return (self.kernel, tuple(self.signature.items()), tuple(sorted(self.constexprs.items())),
                tuple(sorted(self.options.items())))

    def attrs(self, aligned: bool) -> dict:
        """tt.divisibility 16 on the pointers (torch's allocations are aligned) and, if aligned,
        on every integer argument."""
        return {(i,): [["tt.divisibility", 16]] for i, ty in enumerate(self.signature.values())
                if ty.startswith("*") or (aligned and ty[0] in "iu" and ty != "u1")}


_RECORDED: dict[tuple, Launch] = {}
_CONTEXT: dict[str, str] = {"dtype": "", "call": ""}


def _fn_name(fn: JITFunction) -> str:
    return f"{fn.fn.__module__}:{fn.fn.__name__}"


def _arg_type(backend_cls, value: Any) -> str:
    """The signature type the JIT gives a launch argument (a tensor: "*fp32"; an int: "i32"/"i64"),
    without its specialisation of the value 1 (a constexpr): the checker compiles the general case."""
    from triton._C.libtriton import native_specialize_impl
    return native_specialize_impl(backend_cls, value, False, False, False)[0]


def _record(fn: JITFunction, args: tuple, kwargs: dict, configs: Optional[list]) -> None:
    """Records the compiles a launch of fn with these arguments needs (one per autotune config)."""
    from triton.backends.nvidia.compiler import CUDABackend
    params = fn.params
    names = [p.name for p in params]
    bound = dict(zip(names, args))
    options = {k: v for k, v in kwargs.items() if k not in names}
    bound.update({k: v for k, v in kwargs.items() if k in names})
    for p in params:
        if p.name not in bound:
            if not p.has_default:
                raise TypeError(f"launch of {fn.fn.__name__} without argument '{p.name}'")
            bound[p.name] = p.default
    signature, constexprs = {}, {}
    for p in params:
        value = bound[p.name]
        if p.is_constexpr or value is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = f"tl.{value.name}" if isinstance(value, tl.dtype) else value
        else:
            signature[p.name] = _arg_type(CUDABackend, value)
    for cfg in configs or [None]:
        opts, consts = dict(options), dict(constexprs)
        if cfg is not None:
            opts.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            if cfg.maxnreg is not None:
                opts["maxnreg"] = cfg.maxnreg
            consts.update(cfg.kwargs)
        opts.setdefault("num_warps", 4)  # the JIT's default (CUDAOptions)
        launch = Launch(_fn_name(fn), signature, consts, opts)
        launch = _RECORDED.setdefault(launch.key(), launch)
        launch.calls += 1
        if _CONTEXT["dtype"] not in launch.dtypes:
            launch.dtypes.append(_CONTEXT["dtype"])
        launch.example = launch.example or _CONTEXT["call"]


def _jit_run(self, *args, grid, warmup, **kwargs):
    _record(self, args, kwargs, None)


def _autotuner_run(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    fn = self.fn
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    _record(fn, args, kwargs, self.configs)


@contextlib.contextmanager
def recording():
    """Replaces the JIT's and the autotuner's launch with the recorder for the block."""
    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = _jit_run, _autotuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = saved


# ---- driving the op code ------------------------------------------------------------------------
# (N, C, H, W): CIFAR and ImageNet stages, odd sizes, C = 1, C past focus.FUSED_MAX_C, H*W = 1, and
# tensors of 2**31 elements or more (int64 offsets; H*W itself near 2**31 in the last two).
FULL_SHAPES = [(n, c, s, s) for n, c, s in itertools.product((1, 8, 128), (1, 3, 16, 64, 256, 2048, 4096),
                                                              (1, 7, 14, 32, 56, 224))]
FULL_SHAPES += [(2, 5, 3, 5), (3, 100, 9, 11), (256, 64, 56, 56), (256, 512, 128, 128), (64, 512, 256, 256),
                (1, 1, 46341, 46341), (2, 1, 46341, 46341)]
QUICK_SHAPES = [(1, 3, 7, 7), (8, 16, 32, 32), (128, 64, 56, 56), (8, 2048, 7, 7), (2, 4096, 14, 14),
                (1, 64, 224, 224), (2, 5, 3, 5), (256, 512, 128, 128), (1, 1, 46341, 46341)]


def _meta(shape, dtype, channels_last: bool = False) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, device="meta", memory_format=fmt)


def _guard(x: torch.Tensor):
    """The op's device context where the launch code has one (launch() may refuse to run outside it)."""
    device_of = getattr(common, "device_of", None)
    return device_of(x) if device_of is not None else contextlib.nullcontext()


def _op_calls(shape, dtype: torch.dtype, cl: bool) -> list[tuple[str, Callable[[], Any]]]:
    """(description, thunk) for every op and mode whose launch code runs for this input."""
    n, c, h, w = shape
    x, u = _meta(shape, dtype, cl), _meta(shape, dtype, cl)
    k = _meta((n,), dtype)
    g, gp = _meta(shape, dtype, cl), _meta((n, c), dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = _meta((c,), dtype), _meta((c,), dtype)
    mean, var = _meta((c,), acc), _meta((c,), acc)
    grads = (("grad_out", g, None), ("grad_out+grad_pooled", g, gp), ("grad_pooled", None, gp))
    calls = [("gate", lambda: gate._gate_impl(x, u, k)),
             ("gate_pool", lambda: gate.gate_pool_impl(x, u, k)),
             ("residual_gate_pool", lambda: gate.gate_pool_impl(x, u, k, residual=True))]
    for residual, (gname, gv, gpv) in itertools.product((False, True), grads):
        calls.append((f"{'residual_' if residual else ''}gate_pool_backward({gname})",
                      lambda r=residual, gv=gv, gpv=gpv: gate._gate_backward_impl(gv, gpv, x, u, k, r)))
    for training in (True, False):
        if training and n * h * w == 1:
            continue  # BatchNorm needs more than one value per channel in training
        calls.append((f"bn_residual_gate_pool(training={training})",
                      lambda t=training: bn_gate._forward_impl(x, u, k, weight, bias, mean, var, t, 1e-5)))
        for gname, gv, gpv in grads if training or n * h * w == 1 else ():  # the same kernels either way
            calls.append((f"bn_residual_gate_pool_backward(training={training}, {gname})",
                          lambda t=training, gv=gv, gpv=gpv: bn_gate._backward_impl(
                              gv, gpv, x, u, k, weight, bias, mean, var, t, 1e-5)))
    r = max(1, c // 16)
    se = (_meta((r, c), dtype), _meta((r,), dtype), _meta((c, r), dtype), _meta((c,), dtype))
    z_mean = _meta((n, c), acc)
    for weigh in (True, False) if n * h * w > 1 else ():
        name = "bn_se_residual_gate_pool" if weigh else "bn_se_residual"
        calls.append((name, lambda wg=weigh: bn_gate._se_forward_impl(x, u, k, weight, bias, *se, mean, var, True,
                                                                      1e-5, wg)))
        calls.append((f"{name}_backward", lambda wg=weigh: bn_gate._se_backward_impl(
            g, gp if wg else None, x, u, k, weight, bias, *se, mean, var, z_mean, True, 1e-5, wg)))
    for h1 in sorted({max(1, c // 16), max(1, c // 4)}):
        w1, b1, w2, b2 = _meta((h1, c), dtype), _meta((h1,), dtype), _meta((1, h1), dtype), _meta((1,), dtype)
        calls.append((f"focus(H1={h1})", lambda w1=w1, b1=b1, w2=w2, b2=b2: focus._focus_impl(x, w1, b1, w2, b2)))
        calls.append((f"focus_backward(H1={h1})", lambda w1=w1, b1=b1, w2=w2, b2=b2: focus._focus_backward_impl(
            k, x, w1, b1, w2, b2)))
    layout = "channels_last" if cl else "contiguous"
    return [(f"{name} {tuple(shape)} {str(dtype)[6:]} {layout}", f) for name, f in calls]


def _record_task(task: tuple[tuple, tuple[str, ...]]) -> tuple[list[Launch], list[str]]:
    """The launches of every op call for one shape (every dtype, both layouts), and the op calls
    whose launch code failed."""
    shape, dtypes = task
    _RECORDED.clear()
    errors = []
    with recording():
        for dname, cl in itertools.product(dtypes, (False, True)):
            _CONTEXT["dtype"] = dname
            for desc, call in _op_calls(shape, DTYPES[dname], cl):
                _CONTEXT["call"] = desc
                try:
                    with _guard(torch.empty(0, device="meta")):
                        call()
                except Exception as exc:
                    errors.append(f"{desc}: {type(exc).__name__}: {exc}")
    return list(_RECORDED.values()), errors


def collect(shapes, dtypes: list[str], pool) -> tuple[list[Launch], list[str]]:
    """Every distinct compile the op code launches for these shapes and dtypes, both layouts and
    every mode, and the op calls whose launch code failed.  Each launch without int64 offsets also
    comes with them (INT64 set): the offsets' width is a flag, no launch config depends on it, and
    only tensors of 2**31 elements or more would show it otherwise."""
    merged: dict[tuple, Launch] = {}
    errors: list[str] = []
    for launches, errs in pool.map(_record_task, [(shape, tuple(dtypes)) for shape in shapes], chunksize=1):
        errors += errs
        for l in launches:
            m = merged.setdefault(l.key(), l)
            if m is not l:
                m.calls += l.calls
                m.dtypes += [d for d in l.dtypes if d not in m.dtypes]
    for l in list(merged.values()):
        if l.constexprs.get("INT64") is False:
            wide = Launch(l.kernel, l.signature, dict(l.constexprs, INT64=True), l.options, l.calls, list(l.dtypes),
                          f"{l.example} [int64 forced]")
            m = merged.setdefault(wide.key(), wide)
            if m is not wide:
                m.calls += wide.calls
                m.dtypes += [d for d in wide.dtypes if d not in m.dtypes]
    return list(merged.values()), errors


def declared_kernels() -> set[str]:
    """The kernels (jit functions named *_kernel) the Triton modules define: each must be launched."""
    found = set()
    for mod in MODULES:
        for obj in vars(mod).values():
            while isinstance(obj, Autotuner):
                obj = obj.fn
            if (isinstance(obj, JITFunction) and obj.fn.__name__.endswith("_kernel")
                    and obj.fn.__module__ == mod.__name__):
                found.add(_fn_name(obj))
    return found


# ---- the representative set ----------------------------------------------------------------------
def _blocks(l: Launch) -> dict[str, int]:
    return {k: v for k, v in l.constexprs.items() if k.startswith("BLOCK")}


def _per_thread(l: Launch) -> float:
    """Elements of the launch's tiles per thread (all BLOCK* constexprs multiplied): what drives
    register use."""
    return math.prod(_blocks(l).values()) / (32 * l.options["num_warps"])


def _mode(l: Launch) -> tuple:
    """Everything but the tile: the flags, layout, int64, accumulator, argument types and options
    other than num_warps."""
    return (l.kernel, tuple((k, v) for k, v in l.constexprs.items() if not k.startswith("BLOCK")),
            tuple(l.signature.items()), tuple((k, v) for k, v in sorted(l.options.items()) if k != "num_warps"))


def _config(l: Launch) -> tuple:
    """The tile and launch options, per layout and accumulator type."""
    c = l.constexprs
    return (l.kernel, tuple(_blocks(l).items()), tuple(sorted(l.options.items())), c.get("CHANNELS_LAST"),
            c.get("ACC"))


def _weight(l: Launch) -> tuple:
    """How heavy a mode is: flags on (int64 included), then 64-bit integer arguments, then the
    widest pointer element types."""
    bits = {"fp64": 64, "i64": 64, "fp32": 32, "i32": 32, "fp16": 16, "bf16": 16}
    flags = sum(v is True for v in l.constexprs.values())
    wide = sum(t == "i64" for t in l.signature.values())
    ptr = sum(bits.get(t[1:], 0) for t in l.signature.values() if t.startswith("*"))
    return flags, wide, ptr


def _pointers(l: Launch) -> tuple:
    return tuple(t for t in l.signature.values() if t.startswith("*"))


def select(launches: list[Launch], exhaustive: bool = False, quick: bool = False) -> list[tuple[Launch, bool]]:
    """The (launch, aligned) pairs to compile.  Exhaustive: every launch, both integer variants.
    Otherwise a representative set, per kernel (quick: parts 2 and 3 only):
    1. modes: every combination of flags, layout and int64 offsets, for float32 and float64 inputs,
       at its largest tile per thread (of those, the config most op calls use); integers aligned;
    2. dtypes: every combination of argument types (float16, bfloat16 ...) at its heaviest mode and
       largest tile; integers unaligned;
    3. tiles: every tile config (blocks and num_warps, or autotune config) per layout and accumulator
       type with at least half the elements per thread of the largest, in its heaviest mode;
       integers unaligned.
    The integer variants: aligned (all divisible by 16) vectorises loads, unaligned needs more address
    arithmetic; either can need more registers."""
    if exhaustive:
        return [(l, a) for l in launches for a in (False, True)]
    order = {id(l): i for i, l in enumerate(launches)}
    chosen: dict[tuple, tuple[Launch, bool]] = {}

    def pick(groups: dict, rank, aligned: bool) -> None:
        for group in groups.values():
            best = max(group, key=lambda l: (*rank(l), l.calls, -order[id(l)]))
            chosen.setdefault(best.key() + (aligned,), (best, aligned))

    def group_by(key, where=lambda l: True) -> dict:
        groups: dict = {}
        for l in launches:
            if where(l):
                groups.setdefault(key(l), []).append(l)
        return groups

    def acc_like(l: Launch) -> bool:  # float32 or float64 inputs: the pointer types are the accumulator's
        return l.constexprs.get("ACC") is None or all(t[1:] == l.constexprs["ACC"][3:] for t in _pointers(l)[:1])

    flags = lambda l: tuple((k, v) for k, v in l.constexprs.items() if not k.startswith("BLOCK"))  # noqa: E731
    if not quick:
        pick(group_by(lambda l: (l.kernel, flags(l)), acc_like), lambda l: (_per_thread(l), _weight(l)), True)
    pick(group_by(lambda l: (l.kernel, _pointers(l))), lambda l: (_per_thread(l), _weight(l)), False)
    largest: dict[tuple, float] = {}
    for l in launches:
        k = (l.kernel, l.constexprs.get("CHANNELS_LAST"), l.constexprs.get("ACC"))
        largest[k] = max(largest.get(k, 0.0), _per_thread(l))
    big = lambda l: _per_thread(l) >= largest[(l.kernel, l.constexprs.get("CHANNELS_LAST"),  # noqa: E731
                                                   l.constexprs.get("ACC"))]
    pick(group_by(_config, big), _weight, False)
    return list(chosen.values())


# ---- compiling ---------------------------------------------------------------------------------
@dataclass
class Result:
    """A row of the table: one compile and what ptxas reports."""
    kernel: str
    arch: int
    dtypes: str
    flags: str
    num_warps: int
    blocks: str
    ints: str
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    stack: Optional[int] = None
    error: str = ""
    example: str = ""
    seconds: float = 0.0

    def failures(self, max_registers: int) -> list[str]:
        if self.error:
            return ["compile error"]
        out = []
        if (self.spill_stores or 0) + (self.spill_loads or 0) > 0:
            out.append("spills")
        if self.registers is None or self.registers > max_registers:
            out.append(f"> {max_registers} registers" if self.registers is not None else "no register count")
        return out


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict[str, int]:
    out = {}
    for name, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m:
            out[name] = int(m.group(1))
    return out


def _ptxas_log(ptx: str, arch: str, fmad: bool) -> str:
    """ptxas -v over the PTX, for a Triton that does not print its own log."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")]
        if not fmad:
            cmd.insert(1, "--fmad=false")
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _describe(launch: Launch, aligned: bool, arch: int) -> Result:
    c = launch.constexprs
    flags = [k for k, v in c.items() if v is True and not k.startswith("BLOCK")]
    flags += [f"ACC={c['ACC'][3:]}"] if isinstance(c.get("ACC"), str) else []
    blocks = " ".join(f"{k}={v}" for k, v in c.items() if k.startswith("BLOCK"))
    return Result(kernel=launch.kernel.split(":")[1], arch=arch, dtypes=",".join(launch.dtypes),
                  flags=" ".join(flags) or "-", num_warps=launch.options["num_warps"], blocks=blocks or "-",
                  ints="aligned" if aligned else "unaligned", example=launch.example)


def compile_one(job: tuple[Launch, bool, int]) -> Result:
    """Compiles one launch for compute capability arch; registers and spills from ptxas -v."""
    launch, aligned, arch = job
    result = _describe(launch, aligned, arch)
    start = time.perf_counter()
    try:
        module, name = launch.kernel.split(":")
        fn = vars(sys.modules[module])[name]
        while isinstance(fn, Autotuner):
            fn = fn.fn
        constexprs = {k: tl.dtype(v[3:]) if isinstance(v, str) and v.startswith("tl.") else v
                      for k, v in launch.constexprs.items()}
        src = ASTSource(fn=fn, signature=dict(launch.signature), constexprs=constexprs, attrs=launch.attrs(aligned))
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        stats = _parse_ptxas(log.getvalue())
        if "registers" not in stats:
            m = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.MULTILINE)
            stats = _parse_ptxas(_ptxas_log(compiled.asm["ptx"], m.group(1) if m else f"sm_{arch}",
                                            compiled.metadata.enable_fp_fusion))
        for k, v in stats.items():
            setattr(result, k, v)
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:300] if str(exc) else type(exc).__name__
    result.seconds = time.perf_counter() - start
    return result


# ---- main ----------------------------------------------------------------------------------------
def _table(results: list[Result], max_registers: int) -> str:
    head = ("kernel", "arch", "dtype", "flags", "warps", "blocks", "ints", "regs", "spill", "status")
    rows = []
    for r in results:
        spill = "?" if r.spill_stores is None else str(r.spill_stores + (r.spill_loads or 0))
        bad = r.failures(max_registers)
        rows.append((r.kernel, f"sm_{r.arch}", r.dtypes, r.flags, str(r.num_warps), r.blocks, r.ints,
                     "-" if r.registers is None else str(r.registers), spill,
                     "FAIL: " + ", ".join(bad) + (f" ({r.error}; {r.example})" if r.error else f" ({r.example})")
                     if bad else "ok"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    return "\n".join([fmt.format(*head)] + [fmt.format(*row) for row in rows])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[75, 90], metavar="CC",
                   help="compute capabilities to compile for (default: 75 90)")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes, float32/float64 only, and only the heaviest mode of each tile config and dtype")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="input dtypes (default: all four)")
    p.add_argument("--max-registers", type=int, default=MAX_REGISTERS,
                   help=f"fail above this many registers per thread (default {MAX_REGISTERS})")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all CPUs)")
    p.add_argument("--json", metavar="PATH", help="also write every row and a summary as JSON")
    p.add_argument("--kernel", action="append", default=[], metavar="NAME",
                   help="only kernels whose name contains NAME (repeatable)")
    p.add_argument("--exhaustive", action="store_true",
                   help="compile every recorded launch in both integer variants, not the representative set (slow)")
    p.add_argument("--all-rows", action="store_true",
                   help="print every row, not the one with the most registers per kernel, arch and dtype plus the "
                   "failing ones")
    args = p.parse_args(argv)
    for a in args.arch:
        if a < 50:
            p.error(f"argument --arch: {a} is not a CUDA compute capability such as 75 or 90")

    start = time.perf_counter()
    dtypes = args.dtypes or (["float32", "float64"] if args.quick else list(DTYPES))
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        launches, errors = collect(QUICK_SHAPES if args.quick else FULL_SHAPES, dtypes, pool)
        missing = declared_kernels() - {l.kernel for l in launches}
        if args.kernel:
            launches = [l for l in launches if any(s in l.kernel for s in args.kernel)]
        chosen = select(launches, exhaustive=args.exhaustive, quick=args.quick)
        jobs = [(l, a, arch) for arch in args.arch for l, a in chosen]
        # the slowest first (float64, large tiles), so that the pool does not end on one long compile
        jobs.sort(key=lambda j: (j[0].constexprs.get("ACC") != "tl.fp64", -_per_thread(j[0])))
        print(f"triton_compile_check: triton {triton.__version__}: {len(launches)} distinct launches recorded "
              f"in {time.perf_counter() - start:.0f}s; compiling {len(chosen)} x {len(args.arch)} archs = "
              f"{len(jobs)} on {args.jobs} processes", flush=True)
        results = pool.map(compile_one, jobs, chunksize=1)
    results.sort(key=lambda r: (r.kernel, r.arch, r.dtypes, r.flags, r.num_warps, r.blocks, r.ints))

    failed = [r for r in results if r.failures(args.max_registers)]
    if args.all_rows:
        shown = results
    else:  # per (kernel, arch, dtype): the row with the most registers, then every failing row
        best: dict[tuple, Result] = {}
        for r in results:
            key = (r.kernel, r.arch, r.dtypes)
            if key not in best or (r.registers or 0) > (best[key].registers or 0):
                best[key] = r
        shown = sorted({id(r): r for r in [*best.values(), *failed]}.values(),
                       key=lambda r: (r.kernel, r.arch, r.dtypes, r.flags, r.num_warps, r.blocks, r.ints))
    print(_table(shown, args.max_registers))
    regs = [r.registers for r in results if r.registers is not None]
    summary = {"triton": triton.__version__, "archs": args.arch, "compiles": len(results), "failed": len(failed),
               "max_registers": max(regs, default=None), "register_limit": args.max_registers,
               "missing_kernels": sorted(missing), "launch_code_errors": errors,
               "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": [asdict(r) for r in results]}, f, indent=1)
    print(f"triton_compile_check: {len(results)} compiles, {len(failed)} failing "
          f"(compile error, spill or > {args.max_registers} registers), at most {summary['max_registers']} "
          f"registers, {summary['seconds']}s")
    status = 1 if failed or not results else 0
    for e in errors[:20]:
        print(f"triton_compile_check: FAIL: the launch code failed on meta tensors: {e}")
    if missing and not args.kernel:
        print(f"triton_compile_check: FAIL: kernels that no driven op call launches: {sorted(missing)}")
    return 1 if status or errors or (missing and not args.kernel) else 0


if __name__ == "__main__":
    sys.exit(main())
