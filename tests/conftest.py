"""Test set-up shared by every test file.

Triton decides between compiled and interpreted kernels when it is imported, so
the choice is made here, before anything imports triton: on a machine without a
GPU every Triton kernel runs in Triton's interpreter (the "interpret" backend);
on a GPU machine the kernels are compiled (the "triton" backend).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import tritonfp8 as tf8  # noqa: E402

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
# Where and how the Triton kernels run in this test session.
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_BACKEND = "triton" if ON_GPU else "interpret"
if not ON_GPU:
    tf8.backend.ensure_interpreter()  # also for kernels the tests launch directly


def compiled_env() -> dict:
    """This process's environment without the interpreter switches: for a subprocess in which
    Triton compiles (the AOT compiles, the run-time interpreter switch)."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITONFP8_BACKEND")}


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def kernels():
    """Context manager that runs ops with the Triton kernels (compiled or interpreted)."""
    return tf8.use_backend(KERNEL_BACKEND)


def reference():
    """Context manager that runs ops with the PyTorch reference."""
    return tf8.use_backend("torch")
