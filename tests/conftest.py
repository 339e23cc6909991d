"""Shared test setup.

Without a GPU, Triton kernels run under its interpreter (a numpy simulation on the CPU);
TRITON_INTERPRET must be set before triton is first imported, hence here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
