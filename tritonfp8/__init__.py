"""tritonfp8: FP8 training for PyTorch with Triton kernels.

Public names (see README): formats ``E4M3`` / ``E5M2`` / ``E8M0``; :func:`quantize`
returning an :class:`FP8Tensor`; :func:`scaled_mm`; modules in :mod:`tritonfp8.nn`;
:class:`fp8_autocast` and :func:`convert`; recipes; the backend switch.
"""
from . import backend  # first: it may switch Triton to its interpreter before Triton is imported
from . import nn
from . import optim
from .autocast import convert, fp8_autocast
from .backend import get_backend, set_backend, use_backend
from .formats import E4M3, E5M2, E8M0, Format
from .ops.matmul import scaled_mm
from .ops.quantize import quantize
from .recipe import RECIPES, Recipe, TensorRecipe, get_recipe
from .tensor import FP8Tensor, Scaling
from .trainer import StepReport, Trainer
from .training import LossScaler, OverflowTracker, sync_amax_histories

__version__ = "0.1.0"

__all__ = [
    "E4M3", "E5M2", "E8M0", "Format", "FP8Tensor", "Scaling",
    "quantize", "scaled_mm", "nn", "fp8_autocast", "convert",
    "Recipe", "TensorRecipe", "RECIPES", "get_recipe", "optim", "LossScaler", "OverflowTracker", "sync_amax_histories",
    "Trainer", "StepReport",
    "set_backend", "get_backend", "use_backend", "__version__",
]
