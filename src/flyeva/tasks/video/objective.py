"""The video objective: classification of clips with Mixup/CutMix over clips and label smoothing."""

from __future__ import annotations

import torch
from torch import nn

from flyeva.eval.classification import ClassificationObjective


class VideoObjective(ClassificationObjective):
    """`ClassificationObjective` on clips [B, T, C, H, W]: frames are folded into channels for timm's
    Mixup/CutMix, so a clip is blended with one weight and CutMix cuts the same box out of every frame
    (the release's `CutmixMixupBlending` on videos)."""

    input_key = "clips"

    def nothing(self, model: nn.Module, clips: torch.Tensor) -> torch.Tensor:
        """The 3D patch embedding cannot take an empty batch: one blank clip, at weight 0."""
        return model(clips.new_zeros((1, *clips.shape[1:]))).sum() * 0.0

    def mix(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        folded, targets = self.mixup(clips.flatten(1, 2).clone(), labels)
        return folded.view_as(clips), targets
