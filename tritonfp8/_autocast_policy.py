"""fp8_autocast's policy: which calls of stock code can run in fp8 (and why not), and how
multi-head attention is re-expressed from fp8 pieces. The fp8 ops themselves are in
:mod:`tritonfp8.nn.functional`."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .formats import INPUT_DTYPES
from .recipe import Recipe


def fp8_shapes_ok(in_features: int, out_features: int, recipe: Recipe) -> tuple[bool, str]:
    """(ok, reason): whether a product with these K, N dims gains from fp8 (multiples of 16, >= min_dim)."""
    for name, d in (("in_features", in_features), ("out_features", out_features)):
        if d % 16:
            return False, f"{name}={d} is not a multiple of 16"
        if d < recipe.min_dim:
            return False, f"{name}={d} is below min_dim={recipe.min_dim}"
    return True, "fp8"


def _supported_head_dims(attention_impl) -> tuple[int, ...]:
    import sys

    return getattr(sys.modules.get(attention_impl.__module__), "HEAD_DIMS", (64, 128))


def attention_ineligible(q, k, v, attn_mask, dropout_p, enable_gqa, attention_impl, is_causal=False) -> str:
    """Why ``scaled_dot_product_attention(q, k, v, ...)`` cannot use the fp8 op ('' when it can)."""
    if attention_impl is None:
        return "fp8 attention op unavailable"
    if dropout_p:
        return "attention dropout"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "inputs are not [B, H, N, D]"
    if q.shape[1] != k.shape[1] and not (enable_gqa and k.shape[1] and q.shape[1] % k.shape[1] == 0):
        return "key / value heads that do not divide the query heads with enable_gqa"
    if q.shape[-1] not in _supported_head_dims(attention_impl) or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]} (fp8 attention takes {_supported_head_dims(attention_impl)})"
    if is_causal and q.shape[2] != k.shape[2]:
        return "causal with N_q != N_k"
    if attn_mask is not None:
        if is_causal:
            return "attn_mask with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
            return "attn_mask that is not a bool or float tensor"
        if attn_mask.requires_grad:
            return "attn_mask that requires grad (a learned bias, e.g. T5's)"
    for t in (q, k, v):
        if t.dtype not in INPUT_DTYPES:
            return f"dtype {t.dtype}"
    if not (q.dtype == k.dtype == v.dtype):
        return "mixed q/k/v dtypes"
    return ""


def causal_mask_kind(mask: Optional[torch.Tensor], n: int) -> Optional[bool]:
    """True if ``mask`` [n, n] is exactly the causal mask (bool True or -inf above the diagonal)."""
    if mask is None or mask.shape != (n, n):
        return None
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=mask.device), 1)
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, upper))
    return bool(torch.all(torch.isneginf(mask) == upper) and torch.all(mask[~upper] == 0))


def mha_ineligible(a: dict, attention_impl) -> str:
    """Why ``F.multi_head_attention_forward(**a)`` cannot be re-expressed in fp8 ('' when it can)."""
    if attention_impl is None:
        return "fp8 attention op unavailable"
    if a.get("need_weights", True):
        return "need_weights=True (attention weights are not materialized in fp8)"
    for key, what in (("bias_k", "bias_k/bias_v"), ("static_k", "static_k/static_v"),
                      ("static_v", "static_k/static_v")):
        if a.get(key) is not None:
            return what
    if a.get("add_zero_attn", False):
        return "add_zero_attn"
    if a.get("use_separate_proj_weight", False):
        return "separate q/k/v projection weights"
    if a.get("dropout_p", 0.0) and a.get("training", True):
        return "attention dropout"
    if a.get("is_causal", False) and a.get("attn_mask") is None:
        return "is_causal without a mask"
    for key in ("attn_mask", "key_padding_mask"):
        m = a.get(key)
        if m is not None and not (isinstance(m, torch.Tensor) and (m.dtype == torch.bool or m.is_floating_point())):
            return f"{key} that is not a bool or float tensor"
        if m is not None and m.requires_grad:
            return f"{key} that requires grad"
    head_dim = a["embed_dim_to_check"] // a["num_heads"]
    if head_dim not in _supported_head_dims(attention_impl):
        return f"head dim {head_dim} (fp8 attention takes {_supported_head_dims(attention_impl)})"
    return ""


def _mha_sdpa_mask(a: dict, b: int, h: int, n_q: int, n_k: int, unbatched: bool):
    """(causal, SDPA mask or None) of multi_head_attention_forward's attn_mask [L, S] / [B*H, L, S]
    and key_padding_mask [B, S], whose bool True means *masked* (SDPA's True attends)."""
    attn_mask, padding = a.get("attn_mask"), a.get("key_padding_mask")
    if attn_mask is not None and padding is None and attn_mask.dim() == 2 and causal_mask_kind(attn_mask, n_q):
        return True, None
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.reshape(b, h, n_q, n_k) if attn_mask.dim() == 3 else attn_mask)
    if padding is not None:
        parts.append((padding.unsqueeze(0) if unbatched else padding)[:, None, None, :])
    if not parts:
        return False, None
    additive = [torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(m, -math.inf)
                if m.dtype == torch.bool else m.float() for m in parts]
    return False, additive[0] if len(additive) == 1 else additive[0] + additive[1]


def multi_head_attention(a: dict, lin, attention_impl):
    """``F.multi_head_attention_forward`` (need_weights=False) from fp8 pieces.

    query/key/value: [L, B, E] (or unbatched [L, E]); in-projection and out-projection
    through ``lin(x, weight, bias)`` (an fp8 linear), attention through the fp8 op.
    Returns (output [L, B, E], None).
    """
    query, key, value = a["query"], a["key"], a["value"]
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    e, h = a["embed_dim_to_check"], a["num_heads"]
    w, b = a["in_proj_weight"], a["in_proj_bias"]
    if query is key and key is value:  # self-attention: one fp8 product for q, k and v
        q, k, v = lin(query, w, b).chunk(3, dim=-1)
    else:
        ws, bs = w.chunk(3), (b.chunk(3) if b is not None else (None, None, None))
        q, k, v = (lin(t, wi, bi) for t, wi, bi in zip((query, key, value), ws, bs))

    def heads(t):  # [L, B, E] -> [B, H, L, E/H]
        return t.reshape(t.shape[0], t.shape[1], h, e // h).permute(1, 2, 0, 3)

    causal, mask = _mha_sdpa_mask(a, query.shape[1], h, q.shape[0], k.shape[0], unbatched)
    o = attention_impl(heads(q), heads(k), heads(v), causal=causal, attn_mask=mask)
    o = o.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], e)
    out = lin(o, a["out_proj_weight"], a["out_proj_bias"])
    return (out.squeeze(1) if unbatched else out), None
