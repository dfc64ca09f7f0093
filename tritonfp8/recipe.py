"""FP8 training recipes: per tensor role, the format, rounding and scaling (numerics.md section 6).

A :class:`Recipe` gives a :class:`TensorRecipe` for each of the four tensor roles of
a layer's products:

* ``weight``: W, in the forward product and (transposed copy) the input gradient;
* ``activation``: x, in the forward product and (transposed copy) the weight gradient;
* ``error``: dy, the gradient flowing back, in both backward products;
* ``weight_grad``: the weight-gradient product's output dW; ``None`` keeps it in
  high precision, a TensorRecipe rounds it to fp8 in the GEMM epilogue.

Named presets: :data:`RECIPES` ("mellempudi2019", "hybrid", "hybrid_delayed",
"rowwise", "blockwise", "mxfp8"); ``get_recipe(name)`` returns one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from .formats import ROUNDINGS, get_format
from .tensor import Scaling

SCALE_SOURCES = ("current", "delayed")
# The three products of a layer: y = x W^T, dx = dy W, dW = dy^T x.
PRODUCTS = ("forward", "input_grad", "weight_grad")
AMAX_REDUCTIONS = ("max", "most_recent")


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor role is quantized.

    Attributes:
        fmt: "e4m3" or "e5m2".
        rounding: "nearest" or "stochastic".
        scaling: as for :func:`tritonfp8.quantize` ("none", "tensor", "row", (1, 128), (128, 128), "mx", ...).
        scale_source: "current" (from this tensor's amax) or "delayed" (from an amax
            history; "tensor" scaling only).
        margin: headroom of current/delayed scales in powers of two.
        power_of_two: round scales to powers of two.
    """

    fmt: str = "e5m2"
    rounding: str = "nearest"
    scaling: object = "none"
    scale_source: str = "current"
    margin: int = 0
    power_of_two: bool = False

    def __post_init__(self):
        get_format(self.fmt)  # raises with the accepted names
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is not one of {ROUNDINGS}")
        scaling = Scaling.parse(self.scaling)
        if self.scale_source not in SCALE_SOURCES:
            raise ValueError(f"scale_source {self.scale_source!r} is not one of {SCALE_SOURCES}")
        if self.scale_source == "delayed" and scaling.kind != "tensor":
            raise ValueError(
                f"scale_source='delayed' keeps one amax history per tensor and needs scaling='tensor', "
                f"got scaling={scaling}; use scale_source='current' for row/block/mx scales"
            )
        if not isinstance(self.margin, int) or self.margin < 0:
            raise ValueError(f"margin must be a non-negative int, got {self.margin!r}")

    @property
    def parsed_scaling(self) -> Scaling:
        return Scaling.parse(self.scaling)


@dataclass(frozen=True)
class Recipe:
    """Per-role quantization of a layer's three products (y = x W^T, dx = dy W, dW = dy^T x).

    Attributes:
        name: preset name or "custom".
        weight, activation, error: :class:`TensorRecipe` of W, x and dy.
        weight_grad: TensorRecipe of dW (rounded in the GEMM epilogue) or None (high precision).
        amax_history_len, amax_reduction: delayed scaling's history (Transformer Engine's
            defaults: 1024, "max").
        keep_first_conv, keep_last_linear: leave the model's first Conv2d / last Linear in
            high precision when converting (the seed paper does).
        min_dim: layers with a product dimension (K or N) below this, or not a multiple
            of 16, run in high precision (too small to gain; fp8 tensor cores need 16).
        fast_accumulation: the products, of :data:`PRODUCTS`, whose sums stay in the
            tensor cores' reduced-precision accumulator on sm_90 instead of being promoted
            to fp32 every 128 elements (``scaled_mm(fast_accumulation=True)``; Transformer
            Engine does this in the forward). Default: none (numerics.md 5). Elsewhere
            (CPU reference, interpreter, sm_89, sm_100) it changes nothing.
    """

    name: str = "custom"
    weight: TensorRecipe = field(default_factory=TensorRecipe)
    activation: TensorRecipe = field(default_factory=TensorRecipe)
    error: TensorRecipe = field(default_factory=lambda: TensorRecipe(rounding="stochastic"))
    weight_grad: Optional[TensorRecipe] = None
    amax_history_len: int = 1024
    amax_reduction: str = "max"
    keep_first_conv: bool = False
    keep_last_linear: bool = False
    min_dim: int = 16
    fast_accumulation: tuple = ()

    def __post_init__(self):
        for role in ("weight", "activation", "error"):
            if not isinstance(getattr(self, role), TensorRecipe):
                raise TypeError(f"Recipe.{role} must be a TensorRecipe, got {type(getattr(self, role)).__name__}")
        if self.weight_grad is not None:
            if not isinstance(self.weight_grad, TensorRecipe):
                raise TypeError("Recipe.weight_grad must be a TensorRecipe or None (high precision)")
            if self.weight_grad.parsed_scaling.kind != "none" or self.weight_grad.scale_source != "current":
                raise ValueError(
                    "weight_grad is rounded in the GEMM epilogue, where no amax of the whole result exists yet: "
                    "use scaling='none' for it (the loss scale is its scale), or weight_grad=None"
                )
        fast = self.fast_accumulation
        object.__setattr__(self, "fast_accumulation", (fast,) if isinstance(fast, str) else tuple(fast))
        unknown = [p for p in self.fast_accumulation if p not in PRODUCTS]
        if unknown:
            raise ValueError(f"fast_accumulation names products of {PRODUCTS}, got {unknown}")
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.amax_reduction not in AMAX_REDUCTIONS:
            raise ValueError(f"amax_reduction {self.amax_reduction!r} is not one of {AMAX_REDUCTIONS}")
        _check_product_pairing(self.activation, self.weight, "forward (activation x weight)")
        _check_product_pairing(self.error, self.weight, "input gradient (error x weight)")
        _check_product_pairing(self.error, self.activation, "weight gradient (error x activation)")

    def with_(self, **changes) -> "Recipe":
        """A copy with some fields changed (validated again)."""
        return replace(self, name=changes.pop("name", "custom"), **changes)


def _k_block(scaling: Scaling) -> int:
    """Extent along the product's K of one scale group (0: does not vary along K)."""
    if scaling.kind in ("block", "mx"):
        return max(scaling.block)
    return 0


def _check_product_pairing(a: TensorRecipe, b: TensorRecipe, product: str) -> None:
    """Both operands of a product may vary their scale along K only with the same block extent."""
    ka = _k_block(a.parsed_scaling)
    kb = _k_block(b.parsed_scaling)
    if ka and kb and ka != kb:
        raise ValueError(
            f"the {product} product pairs scales with K-blocks of {ka} and {kb}; block scales of both operands "
            "must cover the same K extent (e.g. (1, 128) activations with (128, 128) weights)"
        )
    mx_a, mx_b = a.parsed_scaling.is_mx, b.parsed_scaling.is_mx
    if mx_a != mx_b and (ka or kb):
        raise ValueError(f"the {product} product pairs an MX operand with a non-MX block operand; use mx for both")


E5M2_NEAREST = TensorRecipe("e5m2", "nearest", "none")
E5M2_STOCHASTIC = TensorRecipe("e5m2", "stochastic", "none")

RECIPES = {
    # The seed paper: E5M2 for everything, no per-tensor scale (the loss scale is the
    # only scale), nearest forward, stochastic errors and weight gradients.
    "mellempudi2019": Recipe(
        "mellempudi2019", weight=E5M2_NEAREST, activation=E5M2_NEAREST, error=E5M2_STOCHASTIC,
        weight_grad=E5M2_STOCHASTIC, keep_first_conv=True, keep_last_linear=True,
    ),
    # HFP8 / Transformer Engine: E4M3 forward, E5M2 backward, per-tensor current scaling.
    "hybrid": Recipe(
        "hybrid", weight=TensorRecipe("e4m3", scaling="tensor"), activation=TensorRecipe("e4m3", scaling="tensor"),
        error=TensorRecipe("e5m2", scaling="tensor"),
    ),
    # The same with delayed scaling from an amax history (Transformer Engine's default).
    "hybrid_delayed": Recipe(
        "hybrid_delayed", weight=TensorRecipe("e4m3", scaling="tensor", scale_source="delayed"),
        activation=TensorRecipe("e4m3", scaling="tensor", scale_source="delayed"),
        error=TensorRecipe("e5m2", scaling="tensor", scale_source="delayed"),
    ),
    # torchao "rowwise": E4M3 with one scale per row of each operand along K.
    "rowwise": Recipe(
        "rowwise", weight=TensorRecipe("e4m3", scaling="row"), activation=TensorRecipe("e4m3", scaling="row"),
        error=TensorRecipe("e4m3", scaling="row"),
    ),
    # DeepSeek-V3: 128x128 weight blocks, 1x128 activation and error blocks.
    "blockwise": Recipe(
        "blockwise", weight=TensorRecipe("e4m3", scaling=(128, 128)),
        activation=TensorRecipe("e4m3", scaling=(1, 128)), error=TensorRecipe("e4m3", scaling=(1, 128)),
    ),
    # OCP MXFP8: 1x32 blocks with E8M0 scales.
    "mxfp8": Recipe(
        "mxfp8", weight=TensorRecipe("e4m3", scaling="mx"), activation=TensorRecipe("e4m3", scaling="mx"),
        error=TensorRecipe("e5m2", scaling="mx"),
    ),
}


def get_recipe(recipe) -> Recipe:
    """A :class:`Recipe` from a preset name or a Recipe."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str) and recipe in RECIPES:
        return RECIPES[recipe]
    raise ValueError(f"unknown recipe {recipe!r}; use one of {sorted(RECIPES)} or a tf8.Recipe")
