"""The segmenter's training objective: the model's own loss of a batch of images and label maps."""

from __future__ import annotations

from typing import Any

import torch

from flyeva.engine.loop import StepContext


class SegmentationObjective:
    """Loss of a batch: the model's own (cross-entropy for UperNet, matched mask losses for Mask2Former)."""

    handles_backward = False
    input_key = "images"

    def __call__(self, model: torch.nn.Module, batch: dict[str, Any], ctx: StepContext):
        return model(batch["images"], batch["labels"])
