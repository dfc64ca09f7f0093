"""Per-layer state of the fp8 products: delayed-scaling amax histories, seeds, counters."""
from __future__ import annotations

import itertools
import weakref
from typing import Optional

import torch

from ..ops.quantize import quantize
from ..ops.rounding import inv_scale_from_amax_reference, nonzero_and_flushed
from ..formats import derive_seed, get_format
from ..recipe import Recipe, TensorRecipe
from ..tensor import FP8Tensor

ROLES = ("activation", "weight", "error", "weight_grad")
# handle -> LayerState: the fp8 ops (torch.library custom ops) take a layer as a string, which
# torch.compile keeps as a constant of the graph (an int would become symbolic), and look its
# state up when they run.
_BY_HANDLE: "weakref.WeakValueDictionary[str, LayerState]" = weakref.WeakValueDictionary()
_handles = itertools.count()


def state_of(handle: str) -> "LayerState":
    """The LayerState of an op's ``layer`` handle."""
    state = _BY_HANDLE.get(handle)
    if state is None:
        raise RuntimeError(f"fp8 layer state {handle} no longer exists: an fp8 op ran after its layer "
                           "(or its state) was deleted")
    return state


class LayerState:
    """State that a recipe needs per layer, kept on the layer's device.

    * ``amax_history[role]``: [history_len] fp32 amaxes of past steps (delayed scaling);
      the newest is at index 0.
    * ``seed_base`` and ``calls``: stochastic rounding seeds are
      ``derive_seed(seed_base, calls, role index)`` (the one seed derivation, formats.py), so a
      run is reproducible under ``torch.manual_seed``.
    * ``error_saturated``: int32 [] running count of error values that saturated.
    * ``cast_counts`` (None until :meth:`count_casts` turns it on): int64 [4 roles, 3] on the
      device, per role the values that were nonzero, flushed to zero and saturated in its
      casts, and ``cast_values`` the values cast per role (what an fp8_autocast report shows).
    """

    def __init__(self, recipe: Recipe, device=None, seed_base: Optional[int] = None):
        self.recipe = recipe
        self.seed_base = int(torch.randint(0, 2**31, ()).item()) if seed_base is None else int(seed_base)
        self.calls = 0
        # Every delayed role's history exists from the start, so state_dict() has the same
        # keys before and after training (what strict loading and save_pretrained compare).
        self.amax_history: dict[str, torch.Tensor] = {
            role: torch.zeros(recipe.amax_history_len, dtype=torch.float32, device=device)
            for role in ROLES if getattr(recipe, role) is not None and getattr(recipe, role).scale_source == "delayed"}
        self.error_saturated = torch.zeros((), dtype=torch.int32, device=device)
        self.cast_counts: Optional[torch.Tensor] = None
        self.cast_values = [0] * len(ROLES)
        self.handle = f"layer{next(_handles)}"
        _BY_HANDLE[self.handle] = self

    def __setstate__(self, state: dict) -> None:
        # A copy (copy.deepcopy of a model, pickling) is a layer of its own: its own handle.
        self.__dict__.update(state)
        self.handle = f"layer{next(_handles)}"
        _BY_HANDLE[self.handle] = self

    def count_casts(self) -> None:
        """Count, from now on, what each cast of this layer flushed to zero and saturated."""
        if self.cast_counts is None:
            self.cast_counts = torch.zeros(len(ROLES), 3, dtype=torch.int64, device=self.error_saturated.device)

    def record_cast(self, role: str, x: torch.Tensor, q: FP8Tensor,
                    nonzero_flushed: Optional[torch.Tensor] = None) -> None:
        """Add the cast ``q`` of ``x`` to the counts (when on); ``nonzero_flushed`` is
        :func:`nonzero_and_flushed` of it when the caller computed it already."""
        counts = self.cast_counts
        if counts is None:
            return
        if counts.device != x.device:
            counts = self.cast_counts = counts.to(x.device)
        if nonzero_flushed is None:
            nonzero_flushed = nonzero_and_flushed(x, q.data.view(torch.uint8))
        i = ROLES.index(role)
        counts[i, :2] += nonzero_flushed
        if q.saturated is not None:
            counts[i, 2] += q.saturated
        self.cast_values[i] += x.numel()

    def seed(self, role: str) -> int:
        return derive_seed(self.seed_base, self.calls, ROLES.index(role))

    def _history(self, role: str, device) -> torch.Tensor:
        h = self.amax_history.get(role)
        if h is None:
            h = torch.zeros(self.recipe.amax_history_len, dtype=torch.float32, device=device)
            self.amax_history[role] = h
        elif h.device != torch.device(device):  # the layer moved: its history moves with it
            h = self.amax_history[role] = h.to(device)
        return h

    def quantize(self, x: torch.Tensor, role: str, tensor_recipe: TensorRecipe, transpose: bool,
                 seed: Optional[int] = None, delayed_scale: Optional[torch.Tensor] = None,
                 count: bool = True) -> FP8Tensor:
        """Quantize ``x`` [M, K] for ``role`` as the recipe says, updating the history.

        ``seed`` defaults to :meth:`seed` of the role at the current call count. A backward
        pass that recasts the forward's tensor passes the forward's seed and, for delayed
        scaling, its scale as ``delayed_scale`` (the history is then left alone), so that it
        gets the forward's bits, and ``count=False`` keeps such a recast out of the cast counts
        (as does a caller that records the cast itself with :meth:`record_cast`)."""
        r = tensor_recipe
        scale = None
        if r.scale_source == "delayed" and delayed_scale is not None:
            scale = delayed_scale
        elif r.scale_source == "delayed":
            history = self._history(role, x.device)
            amax = history.amax() if self.recipe.amax_reduction == "max" else history[0]
            fmt = get_format(r.fmt)
            _, scale = inv_scale_from_amax_reference(amax, fmt.max * 2.0**-r.margin, r.power_of_two)
            scale = scale.reshape(())
        q = quantize(
            x, r.fmt, r.rounding, r.parsed_scaling,
            seed=(self.seed(role) if seed is None else seed) if r.rounding == "stochastic" else None,
            transpose=transpose, scale=scale,
            margin=r.margin if scale is None else 0, power_of_two=r.power_of_two if scale is None else False,
        )
        if r.scale_source == "delayed" and delayed_scale is None:
            history = self._history(role, x.device)
            history.copy_(torch.cat([q.amax.reshape(1), history[:-1]]))
        if count:
            self.record_cast(role, x, q)
        return q

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat name -> tensor (no nesting, no Python numbers: what safetensors stores):
        ``seed_base`` and ``calls`` int64 [], ``error_saturated`` int32 [],
        ``amax_history.<role>`` fp32 [amax_history_len] per delayed role."""
        state = {"seed_base": torch.tensor(self.seed_base, dtype=torch.int64),
                 "calls": torch.tensor(self.calls, dtype=torch.int64),
                 "error_saturated": self.error_saturated.clone()}
        state.update({f"{_HISTORY}{role}": h.clone() for role, h in self.amax_history.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the nested form of earlier versions loads too)."""
        missing = [k for k in ("seed_base", "calls", "error_saturated") if k not in state]
        if missing:
            raise KeyError(f"fp8 layer state lacks {missing}; pass a dict from LayerState.state_dict()")
        self.seed_base = int(state["seed_base"])
        self.calls = int(state["calls"])
        self.error_saturated = state["error_saturated"].clone().to(self.error_saturated.device)
        if isinstance(state.get("amax_history"), dict):  # nested form
            histories = state["amax_history"]
        else:
            histories = {k[len(_HISTORY):]: v for k, v in state.items() if k.startswith(_HISTORY)}
        for role, h in histories.items():
            device = self.amax_history[role].device if role in self.amax_history else h.device
            self.amax_history[role] = h.clone().to(device)


_HISTORY = "amax_history."

