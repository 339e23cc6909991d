"""Which GPUs a CUDA build of ``fanet_kernels._C`` runs on: pure logic, no GPU needed.

An arch list has ``TORCH_CUDA_ARCH_LIST``'s form, e.g. ``"7.5;8.0;9.0+PTX"``: entry ``X.Y`` carries
machine code (SASS) for sm_XY, ``+PTX`` its PTX as well.  CUDA's rule: SASS for X.Y runs on compute
capability X.Z with Z >= Y (same major); PTX for X.Y is compiled by the driver for any capability
>= X.Y.  Arch-specific entries (``9.0a``) run on X.Y alone, family entries (``10.0f``) on X.Z, Z >= Y.
setup.py records the list the extension was built for (``_C.cuda_archs()``); the ``cuda`` backend
asks :func:`unsupported_reason` before its first op on a device, so ``auto`` can pass that device on
to Triton instead of failing with "no kernel image" at the first launch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:
    import torch

# sm_75 (T4), sm_80 (A100; its SASS runs on sm_86 and sm_89 too), sm_90 (H100/H200), and sm_90's
# PTX for newer GPUs.  nvcc 13 targets nothing below sm_75.
DEFAULT_ARCH_LIST = "7.5;8.0;9.0+PTX"


@dataclass(frozen=True, order=True)
class Arch:
    """One entry of an arch list: SASS for major.minor, and its PTX when ``ptx``."""

    major: int
    minor: int
    variant: str = ""  # "" | "a" (arch-specific: this capability only) | "f" (family: as SASS)
    ptx: bool = False

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}{self.variant}" + ("+PTX" if self.ptx else "")

    def runs_on(self, capability: tuple[int, int]) -> bool:
        own = (self.major, self.minor)
        if self.variant == "a":
            return capability == own
        if self.ptx and not self.variant and capability >= own:
            return True
        return capability[0] == self.major and capability[1] >= self.minor


_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?", re.IGNORECASE)


def parse_arch_list(text: str) -> tuple[Arch, ...]:
    """``"7.5;8.0;9.0+PTX"`` (separators ``;``, ``,``, ``:`` or spaces) as Arch entries.  Raises
    ValueError naming the entry that is not of the form ``X.Y``, ``X.Ya``, ``X.Yf`` (+PTX)."""
    if not isinstance(text, str):
        raise TypeError(f"fanet: argument 'text' must be a str, got {type(text).__name__}")
    archs = []
    for entry in re.split(r"[;,:\s]+", text.strip()):
        if not entry:
            continue
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ValueError(f"fanet: argument 'text': CUDA arch entry {entry!r} is not of the form X.Y[a|f][+PTX]")
        archs.append(Arch(int(m[1]), int(m[2]), m[3].lower(), m[4] is not None))
    return tuple(archs)


def format_arch_list(archs: Iterable[Arch], sep: str = ";") -> str:
    """The list in TORCH_CUDA_ARCH_LIST's form (``sep`` between entries)."""
    return sep.join(str(a) for a in archs)


def from_gencode_flags(flags: Iterable[str]) -> tuple[Arch, ...]:
    """The arch list that nvcc's ``-gencode=arch=compute_XY,code=sm_XY|compute_XY`` flags build
    (what torch's BuildExtension passes for TORCH_CUDA_ARCH_LIST), sorted."""
    sass: set[tuple[int, int, str]] = set()
    ptx: set[tuple[int, int, str]] = set()
    for flag in flags:
        for codes in re.findall(r"(?<![A-Za-z])code=\[?([^\]\s]+)", flag):
            for kind, num, variant in re.findall(r"(sm|compute)_(\d+)([af]?)", codes):
                key = (int(num) // 10, int(num) % 10, variant)
                (sass if kind == "sm" else ptx).add(key)
    return tuple(Arch(*key, ptx=key in ptx) for key in sorted(sass | ptx))


def runs_on(archs: Iterable[Arch], capability: tuple[int, int]) -> bool:
    """Whether a build for ``archs`` has code that a GPU of compute ``capability`` (major, minor) runs."""
    cap = (int(capability[0]), int(capability[1]))
    return any(a.runs_on(cap) for a in archs)


def unsupported_reason(arch_list: str, capability: tuple[int, int], device_name: str) -> Optional[str]:
    """None where a build for ``arch_list`` runs on the GPU (``device_name``, compute ``capability``),
    else the message that the ``cuda`` backend raises there.  An arch list that does not parse
    (a CMake build for "all" or "native") is not judged here: None, the kernels' own check decides."""
    try:
        archs = parse_arch_list(arch_list)
    except ValueError:
        return None
    if not archs or runs_on(archs, capability):
        return None
    cc = f"{capability[0]}.{capability[1]}"
    return (f"fanet: backend 'cuda' cannot run on {device_name} (compute capability {cc}): fanet_kernels._C "
            f"carries CUDA code for {format_arch_list(archs)} only (SASS X.Y runs on X.Z with Z >= Y, PTX on "
            f"any newer GPU). Use backend 'triton' or 'reference' ('auto' does), or rebuild with "
            f"TORCH_CUDA_ARCH_LIST=\"{cc}\" by an nvcc that targets it (nvcc 13 targets 7.5 and newer).")


def device_check(arch_list: str) -> Callable[["torch.device"], Optional[str]]:
    """A per-device check for the ``cuda`` Backend: ``check(device)`` is None where the build runs on
    that CUDA device, else the reason; asked once per device index, then cached."""
    cache: dict[int, Optional[str]] = {}

    def check(device: "torch.device") -> Optional[str]:
        import torch

        index = device.index
        if torch.compiler.is_compiling():  # no device queries in a traced graph: what eager calls found
            return cache.get(index)  # (unchecked: the kernels' own check raises the same message)
        if index is None:
            if not torch.cuda.is_available():  # no GPU: nothing to judge, the op fails on its own
                return None
            index = torch.cuda.current_device()
        if index not in cache:
            cache[index] = unsupported_reason(arch_list, torch.cuda.get_device_capability(index),
                                              torch.cuda.get_device_name(index))
        return cache[index]

    return check
