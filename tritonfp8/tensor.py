"""FP8Tensor (fp8 data + scale) and the scaling granularities (numerics.md section 4).

Every scaling is described on the 2-D view ``[M, K]`` of a tensor: the last
dimension is K and all leading dimensions are flattened into M. The scale shape
for each granularity:

==============  ==========================  ==========================================
scaling          groups of x [M, K]          scale shape (dtype)
==============  ==========================  ==========================================
"none"           -                           [] fp32, equal to 1
"tensor"         all of x                    [] fp32
"row"            each row (1 x K)            [M, 1] fp32
"col"            each column (M x 1)         [1, K] fp32
(bm, bk)         blocks of bm x bk           [ceil(M/bm), ceil(K/bk)] fp32
"mx"             blocks of 1 x 32            [M, ceil(K/32)] float8_e8m0fnu (powers of two)
==============  ==========================  ==========================================

Blocks are ``(1, B)``, ``(B, 1)`` or ``(B, B)`` with B in 16, 32, 64, 128
(DeepSeek-V3 uses (1, 128) for activations and gradients and (128, 128) for
weights). ``x ~= data * scale`` with the scale broadcast over its group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .formats import E8M0, Format
from .ops.rounding import decode_codes

BLOCK_SIZES = (16, 32, 64, 128)
MX_BLOCK = 32
_KINDS = ("none", "tensor", "row", "col")


@dataclass(frozen=True)
class Scaling:
    """A scaling granularity. ``kind`` is one of none/tensor/row/col/block/mx; ``block`` is (bm, bk)."""

    kind: str
    block: tuple[int, int] = (0, 0)

    @staticmethod
    def parse(spec) -> "Scaling":
        """Accepts "none" (or None), "tensor", "row", "col", "mx", a (bm, bk) tuple, or a Scaling."""
        if isinstance(spec, Scaling):
            return spec
        if spec is None:
            return Scaling("none")
        if isinstance(spec, str):
            s = spec.lower()
            if s in _KINDS:
                return Scaling(s)
            if s == "mx":
                return Scaling("mx", (1, MX_BLOCK))
            if s.startswith("mx:"):  # the op's string form, which keeps the orientation
                bm, bk = (int(v) for v in s[len("mx:"):].split("x"))
                if (bm, bk) not in ((1, MX_BLOCK), (MX_BLOCK, 1)):
                    raise ValueError(f"mx blocks are 1 x {MX_BLOCK} or {MX_BLOCK} x 1, got {bm} x {bk}")
                return Scaling("mx", (bm, bk))
            if s.startswith("block:"):  # the string form used by the torch.library op
                bm, bk = (int(v) for v in s[len("block:"):].split("x"))
                return Scaling.parse((bm, bk))
            raise ValueError(
                f"unknown scaling {spec!r}; use 'none', 'tensor', 'row', 'col', 'mx' or a block shape such as (1, 128) or (128, 128)"
            )
        if isinstance(spec, (tuple, list)):
            if len(spec) != 2 or not all(isinstance(v, int) for v in spec):
                raise ValueError(
                    f"block scaling {tuple(spec)!r} must be a pair of ints (bm, bk) for the [M, K] view, e.g. (1, 128) or (128, 128)"
                )
            bm, bk = spec
            sizes = {bm, bk} - {1}
            if len(sizes) != 1 or next(iter(sizes)) not in BLOCK_SIZES:
                raise ValueError(
                    f"block scaling {(bm, bk)!r} is not supported; use (1, B), (B, 1) or (B, B) with B in {BLOCK_SIZES}"
                )
            return Scaling("block", (bm, bk))
        raise TypeError(f"scaling must be a string or a (bm, bk) tuple, not {type(spec).__name__}")

    def spec(self) -> str:
        """A string that :meth:`parse` turns back into this Scaling."""
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        if self.kind == "mx" and self.block != (1, MX_BLOCK):
            return f"mx:{self.block[0]}x{self.block[1]}"
        return self.kind

    def transposed(self) -> "Scaling":
        """The same groups described on x^T (what the transposed copy uses on [K, M])."""
        if self.kind == "row":
            return Scaling("col")
        if self.kind == "col":
            return Scaling("row")
        if self.kind in ("block", "mx"):
            return Scaling(self.kind, (self.block[1], self.block[0]))
        return self

    def group_shape(self, m: int, k: int) -> tuple[int, int]:
        """The (rows, cols) of one scale group on an [m, k] view."""
        return {
            "none": (max(m, 1), max(k, 1)),
            "tensor": (max(m, 1), max(k, 1)),
            "row": (1, max(k, 1)),
            "col": (max(m, 1), 1),
        }.get(self.kind, self.block)

    def scale_shape(self, m: int, k: int) -> tuple[int, ...]:
        if self.kind in ("none", "tensor"):
            return ()
        gm, gk = self.group_shape(m, k)
        return (-(-m // gm), -(-k // gk))

    @property
    def is_mx(self) -> bool:
        return self.kind == "mx"

    def __str__(self) -> str:
        return f"{self.block[0]}x{self.block[1]}" if self.kind == "block" else self.kind


def expand_scale(scale: torch.Tensor, scaling: Scaling, m: int, k: int) -> torch.Tensor:
    """Broadcast a scale (fp32 or E8M0) to an fp32 [m, k] tensor."""
    s = scale.float() if scale.dtype == E8M0.torch_dtype else scale.to(torch.float32)
    if scaling.kind in ("none", "tensor"):
        return s.reshape(1, 1).expand(m, k)
    gm, gk = scaling.group_shape(m, k)
    return s.repeat_interleave(gm, 0)[:m].repeat_interleave(gk, 1)[:, :k]


@dataclass
class FP8Tensor:
    """A quantized tensor: ``x ~= data * scale``.

    Attributes:
        data: fp8 tensor (``fmt.torch_dtype``) with the shape of the source x.
        scale: dequantization scale, shape per ``scaling`` on the [M, K] view (see module doc).
        fmt: the fp8 :class:`~tritonfp8.formats.Format`.
        scaling: the :class:`Scaling` used.
        amax: fp32 [] max |x| of the source (+inf when x held any NaN or Inf).
        saturated: int32 [] count of finite values that rounded above ``fmt.max``
            (saturated, or became Inf/NaN when ``saturate=False``).
        transposed: for ``transpose=True``, the FP8Tensor of x^T ([K, M]) quantized with
            the same scaling applied to x^T, emitted by the same pass; else None.
    """

    data: torch.Tensor
    scale: torch.Tensor
    fmt: Format
    scaling: Scaling
    amax: Optional[torch.Tensor] = None
    saturated: Optional[torch.Tensor] = None
    transposed: Optional["FP8Tensor"] = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``data * scale`` in ``dtype`` (computed in fp32), with the shape of ``data``."""
        shape = self.data.shape
        k = shape[-1] if len(shape) else 1
        m = math.prod(shape[:-1])
        values = decode_codes(self.data, self.fmt).reshape(m, k)
        out = values * expand_scale(self.scale, self.scaling, m, k)
        return out.reshape(shape).to(dtype)

    def __repr__(self) -> str:
        return (
            f"FP8Tensor(shape={tuple(self.data.shape)}, fmt={self.fmt.name}, scaling={self.scaling}, "
            f"scale_shape={tuple(self.scale.shape)}, device={self.data.device}"
            f"{', transposed' if self.transposed is not None else ''})"
        )
