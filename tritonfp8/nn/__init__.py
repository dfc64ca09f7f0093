"""FP8 modules (Linear, Conv1d/2d/3d) and functional ops (linear, conv1d/2d/3d, attention)."""
from . import functional
from .modules import Conv1d, Conv2d, Conv3d, Linear, fp8_state_dict, load_fp8_state_dict

__all__ = ["Linear", "Conv1d", "Conv2d", "Conv3d", "functional", "fp8_state_dict", "load_fp8_state_dict"]
