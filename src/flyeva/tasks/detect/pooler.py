"""Multi-scale RoIAlign with aligned=True (detectron2's ROIAlignV2), which torchvision's pooler lacks.

torchvision's `MultiScaleRoIAlign` hard-codes aligned=False; the release pools with ROIAlignV2
(half-pixel shift, release `EVA-01/det`). Level assignment is detectron2's/torchvision's
LevelMapper: level = floor(4 + log2(sqrt(area) / 224)), clamped to the pooled levels (FPN eq. 1).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import roi_align

CANONICAL_SIZE, CANONICAL_LEVEL = 224, 4  # FPN paper eq. 1, as detectron2 and torchvision


def assign_levels(boxes: torch.Tensor, min_level: int, max_level: int) -> torch.Tensor:
    """Pyramid level index (0 = min_level) of each [N, 4] xyxy box."""
    sizes = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    # detectron2 `assign_boxes_to_levels`: 1e-8 keeps log2 finite for empty boxes.
    levels = torch.floor(CANONICAL_LEVEL + torch.log2(sizes / CANONICAL_SIZE + 1e-8))
    return (levels.clamp(min_level, max_level) - min_level).long()


def boxes_to_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """Per-image box lists -> [N, 5] (batch index, x0, y0, x1, y1), roi_align's format."""
    if not boxes:
        return torch.zeros(0, 5)
    indices = [torch.full((len(b), 1), i, dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(indices), torch.cat(boxes)], dim=1)


class AlignedMultiScaleRoIAlign(nn.Module):
    """Pool each box from its pyramid level with roi_align(aligned=True) (ROIAlignV2)."""

    def __init__(self, strides: list[int], output_size: int, sampling_ratio: int = 0):
        super().__init__()
        levels = [math.log2(stride) for stride in strides]
        if levels != list(range(int(levels[0]), int(levels[-1]) + 1)):  # integers, one apart
            raise ValueError(f"pooler strides must be consecutive powers of 2, got {strides}")
        self.strides = list(strides)
        self.min_level, self.max_level = int(levels[0]), int(levels[-1])
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio  # 0 = adaptive, as detectron2's ROIAlignV2 default

    def forward(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        """features: one map per stride; boxes: per-image [n_i, 4] -> [sum n_i, C, S, S]."""
        rois = boxes_to_rois(boxes).to(features[0].dtype)
        channels, size = features[0].shape[1], self.output_size
        out = features[0].new_zeros(len(rois), channels, size, size)
        if len(rois) == 0:
            return out
        levels = assign_levels(rois[:, 1:], self.min_level, self.max_level)
        for index, (feature, stride) in enumerate(zip(features, self.strides)):
            chosen = torch.nonzero(levels == index).squeeze(1)
            if len(chosen):
                pooled = roi_align(
                    feature,
                    rois[chosen],
                    (size, size),
                    spatial_scale=1.0 / stride,
                    sampling_ratio=self.sampling_ratio,
                    aligned=True,
                )
                out[chosen] = pooled.to(out.dtype)
        return out
