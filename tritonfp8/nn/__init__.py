"""FP8 modules (Linear, Conv2d) and functional ops (linear, conv2d, attention)."""
from . import functional
from .modules import Conv2d, Linear

__all__ = ["Linear", "Conv2d", "functional"]
