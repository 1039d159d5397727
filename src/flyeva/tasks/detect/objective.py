"""The detector's training objective: the sum of the RPN, cascade-stage and mask losses."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flyeva.engine.loop import StepContext


class DetectionObjective:
    """The sum of RPN, cascade-stage and mask losses; each term is logged."""

    handles_backward = False
    input_key = "images"

    def __call__(
        self, model: nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict]:
        targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in batch["targets"]]
        if not targets:  # every image of the batch was unreadable: a zero that reaches every weight
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0, {}
        try:
            losses = model(batch["images"], targets, batch["image_sizes"].tolist())
        except ValueError as error:
            if "No proposal boxes" not in str(error):
                raise
            # Boxes went non-finite and every proposal was dropped: a diverging model. A NaN loss lets the
            # engine skip the step, roll back and, if it persists, stop with exit 3 (docs/reliability.md).
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * float("nan"), {}
        return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}
