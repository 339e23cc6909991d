"""Shared test setup.

Without a GPU, Triton kernels run under its interpreter (a numpy simulation on the CPU);
TRITON_INTERPRET must be set before triton is first imported, hence here, before op_cases (which
imports fanet_kernels).  ``target`` is the fixture over op_cases.TARGETS, the (backend, device)
pairs every op test runs on.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from op_cases import TARGETS  # noqa: E402  (after TRITON_INTERPRET)


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    """(backend, device): the backend under test and the device its tensors are created on."""
    return request.param
