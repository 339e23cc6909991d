"""Shared test setup.

Without a GPU, Triton kernels run under its interpreter (a numpy simulation on the CPU);
TRITON_INTERPRET must be set before triton is first imported, hence here, before op_cases (which
imports fanet_kernels).  ``target`` is the fixture over op_cases.TARGETS, the (backend, device)
pairs every op test runs on.
"""
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_without_overflow_asserts() -> None:
    """The interpreter checks every int32 add, sub and mul for overflow (recomputed in int64, then an
    assert): a fifth of its time in these tests, and an assert that cannot fire at their sizes (every
    tensor under 2**23 elements; the int64 path is tested by lowering INT64_THRESHOLD, test_triton.py).
    Triton has no switch for it under the interpreter, so its options are replaced; on a GPU the
    asserts exist only with debug=True anyway."""
    try:
        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        builder.options = dataclasses.replace(builder.options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another triton: keep its default
        pass


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_without_overflow_asserts()

from op_cases import TARGETS  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    """(backend, device): the backend under test and the device its tensors are created on."""
    return request.param
