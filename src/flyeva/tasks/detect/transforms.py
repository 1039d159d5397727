"""Large-scale jitter for training and the longest-side resize for testing (release `EVA-01/det`).

LSJ (Ghiasi et al. 2021, as ViTDet): flip, resize by a random scale of the target size (aspect
kept), a random crop of at most target x target, boxes recomputed from the cropped masks (without
masks, detectron2's box transform), emptied instances dropped. Pixels stay 0-255. Randomness comes
from torch's default generator, which the stream seeds per sample, so a resumed run draws the same crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass
class Sample:
    """A transformed image (uint8 [3, h, w]) and its targets in the same pixel frame."""

    image: torch.Tensor
    boxes: torch.Tensor  # float [n, 4] xyxy
    labels: torch.Tensor  # long [n]
    masks: torch.Tensor | None  # bool [n, h, w]; None for a box-only sample


def _resize_masks(masks: np.ndarray, height: int, width: int) -> torch.Tensor:
    if len(masks) == 0:
        return torch.zeros(0, height, width, dtype=torch.bool)
    resized = F.interpolate(torch.from_numpy(masks)[None].float(), size=(height, width), mode="nearest")
    return resized[0] > 0.5


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes (pixel edges) of bool masks [n, h, w]; empty masks give zero boxes."""
    boxes = torch.zeros(len(masks), 4)
    for slot, mask in enumerate(masks):
        rows, cols = torch.nonzero(mask.any(1)).squeeze(1), torch.nonzero(mask.any(0)).squeeze(1)
        if len(rows):
            boxes[slot] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    return boxes


class LargeScaleJitter:
    """Training transform: flip, scale in [min_scale, max_scale] x `size`, crop to `size`."""

    def __init__(self, size: int, min_scale: float = 0.1, max_scale: float = 2.0, flip: float = 0.5):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"LSJ needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.size, self.min_scale, self.max_scale, self.flip = size, min_scale, max_scale, flip

    def __call__(
        self,
        image: Image.Image,
        masks: np.ndarray | None,
        labels: np.ndarray,
        boxes: np.ndarray | None = None,
    ) -> Sample:
        """`masks` bool [n, H, W] (boxes are recomputed from them), or None with `boxes` [n, 4] xyxy."""
        flipped = float(torch.rand(())) < self.flip
        original_width = image.width
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            masks = masks[:, :, ::-1] if masks is not None else None
        scale = self.min_scale + float(torch.rand(())) * (self.max_scale - self.min_scale)
        # detectron2 ResizeScale: fit the scaled target box, aspect ratio kept
        factor = min(scale * self.size / image.height, scale * self.size / image.width)
        height, width = max(1, round(image.height * factor)), max(1, round(image.width * factor))
        scale_y, scale_x = height / image.height, width / image.width
        image = image.resize((width, height), Image.Resampling.BILINEAR)
        top = int(torch.randint(0, max(0, height - self.size) + 1, ()))
        left = int(torch.randint(0, max(0, width - self.size) + 1, ()))
        bottom, right = min(height, top + self.size), min(width, left + self.size)
        pixels = torch.from_numpy(np.asarray(image)[top:bottom, left:right].copy()).permute(2, 0, 1)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if masks is None:
            moved = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4).clone()
            if flipped:
                moved[:, [0, 2]] = original_width - moved[:, [2, 0]]
            moved *= torch.tensor([scale_x, scale_y, scale_x, scale_y])
            moved -= torch.tensor([left, top, left, top], dtype=torch.float32)
            moved[:, 0::2] = moved[:, 0::2].clamp(0, right - left)
            moved[:, 1::2] = moved[:, 1::2].clamp(0, bottom - top)
            keep = (moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1])
            return Sample(pixels, moved[keep], labels[keep], None)
        resized = _resize_masks(np.ascontiguousarray(masks), height, width)[:, top:bottom, left:right]
        boxes = boxes_from_masks(resized)  # release LSJ: boxes recomputed from the cropped masks
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return Sample(pixels, boxes[keep], labels[keep], resized[keep])


class ResizeLongestSide:
    """Test transform: the longest side to `size` (detectron2 ResizeShortestEdge(size, max_size=size))."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        factor = self.size / max(image.height, image.width)
        size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
        resized = image.resize(size, Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(resized).copy()).permute(2, 0, 1)
