"""tritonfp8: FP8 training for PyTorch with Triton kernels.

Public names (see README): formats ``E4M3`` / ``E5M2`` / ``E8M0``, :func:`quantize`
returning an :class:`FP8Tensor`, and the backend switch :func:`set_backend`.
"""
from . import backend  # first: it may switch Triton to its interpreter before Triton is imported
from .backend import get_backend, set_backend, use_backend
from .formats import E4M3, E5M2, E8M0, Format
from .ops.quantize import quantize
from .tensor import FP8Tensor, Scaling

__version__ = "0.1.0"

__all__ = [
    "E4M3", "E5M2", "E8M0", "Format", "FP8Tensor", "Scaling",
    "quantize", "set_backend", "get_backend", "use_backend", "__version__",
]
