"""PyTorch's transparent-huge-page allocation of large CPU tensors, on by default for the commands that
train or evaluate models on inputs larger than 32x32.

With ``THP_MEM_ALLOC_ENABLE=1`` PyTorch aligns CPU allocations of 2 MiB or more to 2 MiB and marks them
``madvise(MADV_HUGEPAGE)``: a fresh activation then costs one page fault per 2 MiB instead of one per
4 KiB, which is much of the time of memory-bound CPU ops on activations of 32 MiB or more (glibc maps
each of those anew; smaller ones it reuses, and there the setting can add faults: benchmarks/PROFILE.md).
PyTorch reads the variable once, at its first CPU allocation, so it must be in the environment before
then.  Importing torch and fanet_kernels allocates nothing on the CPU, so setting it at the start of
``main()`` is enough; :func:`setup` checks that it took effect (the kernel's ``THPeligible`` flag of a
fresh 4 MiB tensor's mapping) and, if something allocated first, re-executes the process once with it set.

Inputs of 32x32 or less (digits, CIFAR) keep it off by default: their activations stay under 32 MiB, where
glibc reuses freed memory without faults and huge pages add faults instead (a FA-ResNet-56 CIFAR step at
batch 128 took 4-8 % longer with it, benchmarks/PROFILE.md item 15).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

ENV = "THP_MEM_ALLOC_ENABLE"
# Set (to the setting's source) in the environment of the one re-execution, so that it cannot happen twice.
REEXEC_MARK = "FANET_THP_REEXEC"
KERNEL_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
PROBE_BYTES = 4 << 20
# Inputs of this side or less get the variable off by default (see the module docstring).
SMALL_INPUT = 32
FLAG_HELP = (f"do not set {ENV}=1 (set by default on Linux for inputs larger than {SMALL_INPUT}x{SMALL_INPUT} "
             "unless the environment sets it: PyTorch then allocates CPU tensors of 2 MiB or more on "
             "transparent huge pages, with fewer page faults)")


def default_value(image_size: Optional[int]) -> str:
    """The value fanet sets when neither the environment nor --no-thp decides: "0" for inputs of
    SMALL_INPUT x SMALL_INPUT or less, else (or when the size is not known yet) "1"."""
    return "0" if image_size is not None and image_size <= SMALL_INPUT else "1"


@dataclass(frozen=True)
class Status:
    value: str            # the variable's value in this process ("1", "0", ...)
    source: str           # "fanet" (the default), "--no-thp" or "environment"
    active: Optional[bool]  # huge pages verified on a fresh tensor (None: not checked)
    kernel: Optional[str]   # the kernel's transparent_hugepage mode (always, madvise, never)

    def line(self) -> str:
        """The one line the commands print."""
        head = f"fanet: {ENV}={self.value}"
        if self.source == "--no-thp":
            return f"{head} (--no-thp): CPU tensors use PyTorch's default allocation (4 KiB pages)"
        if self.source == "fanet" and not enabled(self.value):
            return (f"{head} (set by fanet for inputs of {SMALL_INPUT}x{SMALL_INPUT} or less; {ENV}=1 in the "
                    "environment turns it on): CPU tensors use PyTorch's default allocation (4 KiB pages)")
        if not enabled(self.value):
            return f"{head} (from the environment): CPU tensors use PyTorch's default allocation (4 KiB pages)"
        if self.kernel == "never":
            return f"{head}, without effect: the kernel's transparent_hugepage mode is 'never'"
        if self.active is False:
            return (f"{head}, without effect: PyTorch allocated CPU memory before it was set "
                    f"(set {ENV}=1 in the environment before Python starts)")
        origin = "from the environment" if self.source == "environment" else "set by fanet; --no-thp turns it off"
        return f"{head} ({origin}): CPU tensors of 2 MiB or more are allocated on transparent huge pages"


def enabled(value: Optional[str]) -> bool:
    """PyTorch's reading of the variable: an integer, non-zero means on."""
    try:
        return int((value or "0").strip()) != 0
    except ValueError:
        return False


def kernel_mode() -> Optional[str]:
    """The bracketed word of /sys/kernel/mm/transparent_hugepage/enabled, or None if unreadable."""
    try:
        text = open(KERNEL_SETTING).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def huge_pages_active() -> Optional[bool]:
    """Whether a fresh CPU tensor of 4 MiB lies in a mapping the kernel may back with huge pages
    (its ``THPeligible`` flag in /proc/self/smaps), or None if that cannot be read.  Under the kernel
    mode 'madvise' this is set only if PyTorch advised it, i.e. if ``THP_MEM_ALLOC_ENABLE`` took effect."""
    import torch

    probe = torch.empty(PROBE_BYTES, dtype=torch.uint8)
    address = probe.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping's header: "lo-hi perms ..."
                    lo, _, hi = head.partition("-")
                    inside = int(lo, 16) <= address < int(hi, 16)
                elif inside and head == "THPeligible:":
                    return line.split()[1] != "0"
    except (OSError, ValueError, IndexError):
        return None
    return None


def setup(off: bool, may_reexec: bool, image_size: Optional[int] = None) -> Optional[Status]:
    """Put ``THP_MEM_ALLOC_ENABLE`` in the environment as the command should run: as the user set it,
    else :func:`default_value` of the command's input size (0 with ``off``, the ``--no-thp`` flag, which
    wins over the environment).  Returns what this process runs with, or None off Linux (the variable
    does nothing there).

    ``may_reexec``: the caller owns the process (``main()`` called as the program); if the setting did
    not take effect because PyTorch had already allocated, the process is re-executed once with it set."""
    if not sys.platform.startswith("linux"):
        return None
    reexecuted = os.environ.pop(REEXEC_MARK, None)  # the first run's source of the setting
    if reexecuted:
        value, source = os.environ.get(ENV, "1"), reexecuted
    elif off:
        value, source = "0", "--no-thp"
    elif os.environ.get(ENV) is not None:
        value, source = os.environ[ENV], "environment"
    else:
        value, source = default_value(image_size), "fanet"
    os.environ[ENV] = value
    kernel = kernel_mode()
    active = None
    if enabled(value) and kernel == "madvise":  # under 'always' every mapping is eligible: nothing to check
        active = huge_pages_active()
        if active is False and may_reexec and not reexecuted:
            reexec(source)
    return Status(value, source, active, kernel)


def reexec(source: str) -> None:
    """Replace this process by the same command line, with the variable (already in os.environ) set
    from its start."""
    os.environ[REEXEC_MARK] = source
    argv = list(getattr(sys, "orig_argv", []))[1:] or ["-m", "fanet_kernels", *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


def restore(value: Optional[str]) -> None:
    """Put the variable back as it was (``value``; None: unset)."""
    if value is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = value
