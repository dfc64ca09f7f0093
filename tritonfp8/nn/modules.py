"""FP8 modules: drop-in nn.Linear / nn.Conv2d whose products run in fp8.

They keep the same parameters (and state_dict keys) as the torch modules they
replace, plus the recipe's per-layer state (delayed-scaling amax histories, the
seed base and call counter, the error saturation count) as tensors under
``fp8_state.*`` in ``state_dict``. Those keys are optional on load: a stock
checkpoint of the same model loads strictly, and the layers keep a fresh state.
"""
from __future__ import annotations

import torch
from torch import nn

from ..recipe import get_recipe
from . import functional as F8
from .state import LayerState


class _FP8StateMixin:
    """Keeps a :class:`LayerState` and saves it in the module's state_dict."""

    def _init_fp8(self, recipe):
        self.recipe = get_recipe(recipe)
        self.fp8_state = LayerState(self.recipe)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, value in self.fp8_state.state_dict().items():
            destination[prefix + _STATE + name] = value

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The fp8 state is optional on load: a stock checkpoint (no such keys) loads strictly
        # and the layer keeps its fresh state.
        ours = {k[len(prefix + _STATE):]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + _STATE)}
        if prefix + "fp8_state" in state_dict:  # the nested form of earlier versions
            ours = state_dict.pop(prefix + "fp8_state")
        if ours:
            try:
                self.fp8_state.load_state_dict(ours)
            except (KeyError, RuntimeError, ValueError) as error:
                error_msgs.append(f"{prefix}{_STATE}*: {error}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


_STATE = "fp8_state."


class Linear(_FP8StateMixin, nn.Linear):
    """``nn.Linear`` with y = x W^T + b, dx and dW computed by fp8 products.

    Shapes: input [..., in_features], weight [out_features, in_features], output [..., out_features].
    ``recipe``: a preset name ("hybrid", "mellempudi2019", "blockwise", ...) or a tf8.Recipe.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 recipe="hybrid"):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_fp8(recipe)

    @classmethod
    def from_float(cls, module: nn.Linear, recipe="hybrid") -> "Linear":
        """An fp8 Linear sharing ``module``'s parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = module.in_features, module.out_features
        new.weight, new.bias = module.weight, module.bias
        new._init_fp8(recipe)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F8.linear(x, self.weight, self.bias, self.recipe, self.fp8_state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"


class Conv2d(_FP8StateMixin, nn.Conv2d):
    """``nn.Conv2d`` computed as an fp8 GEMM (im2col): input [B, C, H, W] -> [B, O, Ho, Wo].

    stride, padding (int, pair, "valid", "same"), dilation, groups, bias and padding_mode as nn.Conv2d.
    """

    def __init__(self, *args, recipe="hybrid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(recipe)

    @classmethod
    def from_float(cls, module: nn.Conv2d, recipe="hybrid") -> "Conv2d":
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        new._modules = dict(module._modules)
        new._init_fp8(recipe)
        return new

    def _conv_forward(self, x, weight, bias):
        if self.padding_mode != "zeros":
            x = torch.nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return F8.conv2d(x, weight, bias, self.stride, padding, self.dilation, self.groups, self.recipe, self.fp8_state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"
