"""FP8 modules: drop-in nn.Linear / nn.Conv1d / Conv2d / Conv3d whose products run in fp8.

They keep the same parameters and exactly the same ``state_dict`` keys as the torch
modules they replace, so checkpoints load strictly both ways (stock -> converted ->
stock, ``save_pretrained`` / ``from_pretrained``). The recipe's per-layer state
(delayed-scaling amax histories, the seed base and call counter, the error
saturation count) is saved apart, by :func:`fp8_state_dict` (``tf8.Trainer.state_dict``
includes it): with both, a resume is bit-identical; without it the layers start a
fresh fp8 state. ``load_state_dict`` still takes the ``fp8_state.*`` keys that
earlier versions put in ``state_dict``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..recipe import get_recipe
from . import functional as F8
from .state import LayerState


class _FP8StateMixin:
    """Keeps a :class:`LayerState` (saved by :func:`fp8_state_dict`, not in ``state_dict``)."""

    def _init_fp8(self, recipe):
        self.recipe = get_recipe(recipe)
        self.fp8_state = LayerState(self.recipe)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints of earlier versions hold the fp8 state in state_dict: it is restored.
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


def _fp8_modules(model: nn.Module):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, _FP8StateMixin))


def fp8_layer_states(model: nn.Module) -> list:
    """(module name, :class:`LayerState`) of every tf8.nn module in ``model``, in module order."""
    return [(name, m.fp8_state) for name, m in _fp8_modules(model)]


def fp8_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The fp8 state of every tf8.nn module in ``model``: ``{"<module>.fp8_state.<key>": tensor}``
    (keys of :meth:`LayerState.state_dict`; tensors only, so safetensors stores it). Save it
    beside ``model.state_dict()`` for a bit-identical resume of stochastic and delayed recipes."""
    return {f"{name}.{_STATE}{key}" if name else f"{_STATE}{key}": value
            for name, m in _fp8_modules(model) for key, value in m.fp8_state.state_dict().items()}


def load_fp8_state_dict(model: nn.Module, state: dict, strict: bool = True) -> None:
    """Restore an :func:`fp8_state_dict` into the tf8.nn modules of ``model`` (the same model).

    ``strict``: every key must name an fp8 module of ``model`` and every such module must
    get its state; False skips what does not match (those layers keep their state)."""
    modules = dict(_fp8_modules(model))
    per_module: dict[str, dict] = {}
    for key, value in state.items():
        name, sep, rest = key.rpartition(_STATE)
        name = name[:-1] if name.endswith(".") else name
        if not sep or name not in modules:
            if strict:
                raise KeyError(f"fp8 state key {key!r} names no tf8.nn module of the model; load the fp8 state "
                               "of the same model, or pass strict=False")
            continue
        per_module.setdefault(name, {})[rest] = value
    missing = sorted(set(modules) - set(per_module))
    if strict and missing:
        raise KeyError(f"the fp8 state has nothing for the tf8.nn modules {missing}; pass strict=False to keep "
                       "their current state")
    for name, layer_state in per_module.items():
        modules[name].fp8_state.load_state_dict(layer_state)


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


class _FP8ConvMixin(_FP8StateMixin):
    """The fp8 conv modules: the stock module's attributes, products through :func:`F8.conv`."""

    @classmethod
    def from_float(cls, module, recipe="hybrid"):
        """An fp8 conv sharing ``module``'s parameters (and every other attribute)."""
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
        return F8.conv(x, weight, bias, self.stride, padding, self.dilation, self.groups, self.recipe, self.fp8_state)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", recipe={self.recipe.name}"


class Conv1d(_FP8ConvMixin, nn.Conv1d):
    """``nn.Conv1d`` computed as an fp8 GEMM (im2col): input [B, C, L] -> [B, O, L_out].

    Arguments as nn.Conv1d (padding: int, tuple, "valid", "same"), plus ``recipe``.
    """

    def __init__(self, *args, recipe="hybrid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(recipe)


class Conv2d(_FP8ConvMixin, nn.Conv2d):
    """``nn.Conv2d`` computed as an fp8 GEMM (im2col): input [B, C, H, W] -> [B, O, Ho, Wo].

    Arguments as nn.Conv2d (padding: int, pair, "valid", "same", even kernels too), plus ``recipe``.
    """

    def __init__(self, *args, recipe="hybrid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(recipe)


class Conv3d(_FP8ConvMixin, nn.Conv3d):
    """``nn.Conv3d`` computed as an fp8 GEMM (im2col): input [B, C, D, H, W] -> [B, O, Do, Ho, Wo].

    Arguments as nn.Conv3d, plus ``recipe``.
    """

    def __init__(self, *args, recipe="hybrid", **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fp8(recipe)
