"""Which frames a clip uses (TSN sampling) and how its pixels are augmented (release `EVA-01/video`).

The rules are docs/video.md's "Sampling" and "Augmentation". Deviations from the release: test
views are deterministic (the release draws them with the random training sampler), and a video
with fewer than T frames takes floor((i + 0.5) n / T), always in range (the release's rounding can
index frame n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from flyeva.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MULTI_SCALES = (1.0, 0.875, 0.75, 0.66)  # release `EVA-01/video` datasets/pipeline.py MultiScaleCrop


def tsn_train_indices(num_frames: int, segments: int, rng: np.random.Generator) -> list[int]:
    """One random frame per segment of num_frames // segments frames (centre rule when too short)."""
    if num_frames < 1 or segments < 1:
        raise ValueError(f"need num_frames >= 1 and segments >= 1, got {num_frames}, {segments}")
    length = num_frames // segments
    if length == 0:
        return tsn_test_indices(num_frames, segments)
    return (np.arange(segments) * length + rng.integers(0, length, size=segments)).tolist()


def tsn_test_indices(num_frames: int, segments: int, view: int = 0, views: int = 1) -> list[int]:
    """Frame floor((i + (view + 0.5) / views) * num_frames / segments) of each segment i: deterministic."""
    if not 0 <= view < views:
        raise ValueError(f"view must be in [0, {views}), got {view}")
    # Exact integer arithmetic: floor(((2i views + 2 view + 1) n) / (2 views T)).
    numerators = (2 * views * np.arange(segments) + 2 * view + 1) * num_frames
    return (numerators // (2 * views * segments)).tolist()


def multi_view_indices(num_frames: int, segments: int, views: int) -> list[int]:
    """All views' indices, view-major: views x segments entries."""
    return [i for view in range(views) for i in tsn_test_indices(num_frames, segments, view, views)]


def _to_float(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean).view(1, 3, 1, 1)
    std_t = torch.tensor(std).view(1, 3, 1, 1)
    return (frames.float() / 255.0 - mean_t) / std_t


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [T, 3, H, W]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


class ClipTrainTransform:
    """uint8 [T, H, W, 3] -> normalised float [T, 3, size, size]; randomness from torch's global RNG."""

    def __init__(
        self,
        image_size: int = 224,
        scales: Sequence[float] = MULTI_SCALES,
        hflip: float = 0.5,
        color_jitter: float = 0.8,
        grayscale: float = 0.2,
    ):
        self.image_size, self.scales, self.hflip = image_size, tuple(scales), hflip
        # v2 transforms draw their parameters once per call: one jitter for all frames of a clip.
        self.photometric = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=color_jitter),
                v2.RandomGrayscale(p=grayscale),
            ]
        )

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width) of one multi-scale crop (mmaction's fixed-crop rule)."""
        base = min(height, width)
        sizes = [int(base * scale) for scale in self.scales]
        pairs = [(h, w) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= 1]
        crop_h, crop_w = pairs[int(torch.randint(len(pairs), ()))]
        step_h, step_w = (height - crop_h) // 4, (width - crop_w) // 4
        positions = [
            (0, 0),
            (0, 4 * step_w),
            (4 * step_h, 0),
            (4 * step_h, 4 * step_w),
            (2 * step_h, 2 * step_w),
        ]
        top, left = positions[int(torch.randint(len(positions), ()))]
        return top, left, crop_h, crop_w

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        clip = frames_to_tensor(frames)
        top, left, crop_h, crop_w = self.crop_box(*clip.shape[-2:])
        clip = clip[..., top : top + crop_h, left : left + crop_w]
        clip = v2.functional.resize(clip, [self.image_size, self.image_size], antialias=True)
        if float(torch.rand(())) < self.hflip:
            clip = clip.flip(-1)
        return _to_float(self.photometric(clip), IMAGENET_MEAN, IMAGENET_STD)


def three_crop_boxes(height: int, width: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(top, left) of `crops` (1 or 3) squares of `size`: along the long side, centre first."""
    if crops not in (1, 3):
        raise ValueError(f"data.test_crops must be 1 or 3, got {crops}")
    if min(height, width) < size:
        raise ValueError(
            f"frames of {height}x{width} are smaller than the crop {size}; raise data.short_side"
        )
    centre = ((height - size) // 2, (width - size) // 2)
    if crops == 1:
        return [centre]
    if width >= height:
        return [centre, (centre[0], 0), (centre[0], width - size)]
    return [centre, (0, centre[1]), (height - size, centre[1])]


class ClipEvalTransform:
    """uint8 [V*T, H, W, 3] -> float [V * crops, T, 3, size, size]: every view x every crop."""

    def __init__(
        self,
        image_size: int = 224,
        views: int = 1,
        crops: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ):
        self.image_size, self.views, self.crops = image_size, views, crops
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        clip = frames_to_tensor(frames)
        frames_per_view = clip.shape[0] // self.views
        size = self.image_size
        out = []
        for view in clip.split(frames_per_view):
            for top, left in three_crop_boxes(view.shape[-2], view.shape[-1], size, self.crops):
                out.append(view[..., top : top + size, left : left + size])
        return _to_float(torch.stack(out), self.mean, self.std)
