"""fp16 dynamic loss scaling with the release's hysteresis and minimum scale (docs/recipes.md §3).

torch's GradScaler halves the scale at every overflow. The release (DeepSpeed's dynamic loss
scaler) first spends one of `hysteresis` lives: with hysteresis 2 a single overflow only skips the
step, a second one before the scale grows again halves it; the scale never drops below
`min_scale`, and a run of `growth_interval` clean steps doubles it and restores the lives.
Everything stays on the device, so there is no host sync per step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler


class HysteresisMixin:
    """Adds `hysteresis` and `min_scale` to a torch GradScaler (plain or FSDP's sharded one)."""

    def __init__(self, *args: Any, hysteresis: int = 2, min_scale: float = 1.0, **kwargs: Any):
        if hysteresis < 1:
            raise ValueError(f"fp16 hysteresis must be >= 1 (1 = torch's behaviour), got {hysteresis}")
        super().__init__(*args, **kwargs)
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self._lives: torch.Tensor | None = None  # on the scale's device, made with the scale
        self._pending_lives: float | None = None  # from a checkpoint loaded before the first scale()

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        if not self._enabled or new_scale is not None:
            return super().update(new_scale)
        found = [
            found_inf
            for state in self._per_optimizer_states.values()
            for found_inf in state["found_inf_per_device"].values()
        ]
        if not found:  # let torch raise its own "no inf checks were recorded" error
            return super().update()
        before = self._scale.clone()
        overflow = torch.stack([f.to(before.device) for f in found]).sum() > 0
        super().update()
        absorbed = overflow & (self._lives > 1)
        scale = torch.where(absorbed, before, self._scale)
        scale = torch.where(overflow & ~absorbed, scale.clamp(min=self.min_scale), scale)
        lives = torch.where(absorbed, self._lives - 1, self._lives)
        self._lives.copy_(torch.where(scale > before, float(self.hysteresis), lives))
        self._scale.copy_(scale)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            lives = self.hysteresis if self._lives is None else float(self._lives.item())
            state.update(hysteresis=self.hysteresis, min_scale=self.min_scale, hysteresis_left=lives)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        lives = state.pop("hysteresis_left", None)
        state.pop("hysteresis", None)
        state.pop("min_scale", None)
        super().load_state_dict(state)
        self._pending_lives = lives
        if lives is not None and self._scale is not None:
            self._lives = torch.full_like(self._scale, float(lives))

    def _lazy_init_scale_growth_tracker(self, dev: torch.device) -> None:
        super()._lazy_init_scale_growth_tracker(dev)
        lives = self.hysteresis if self._pending_lives is None else self._pending_lives
        self._lives = torch.full_like(self._scale, float(lives))


class HysteresisGradScaler(HysteresisMixin, torch.amp.GradScaler):
    """torch.amp.GradScaler with the release's hysteresis and minimum scale."""


class ShardedHysteresisGradScaler(HysteresisMixin, ShardedGradScaler):
    """FSDP2's ShardedGradScaler with the release's hysteresis and minimum scale."""
