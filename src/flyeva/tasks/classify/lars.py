"""LARS, as MAE's `util/lars.py` (from MoCo v3) has it: the linear probe's optimizer (docs/recipes.md §4)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each matrix is rescaled to trust * |w| / |g + wd * w|; parameters
    with at most one dimension (biases, norms) get neither weight decay nor the rescaling."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                update = param.grad
                if update is None:
                    continue
                if param.ndim > 1:
                    update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(param), torch.norm(update)
                    ratio = group["trust_coefficient"] * param_norm / update_norm
                    trust = torch.where(
                        (param_norm > 0) & (update_norm > 0), ratio, torch.ones_like(param_norm)
                    )
                    update = update.mul(trust)
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                state["mu"].mul_(group["momentum"]).add_(update)
                param.add_(state["mu"], alpha=-group["lr"])
        return loss
