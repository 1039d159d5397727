"""mmseg's training pipeline for (image, label map) pairs, as the release's seg configs use it:
ratio-range resize, random crop with cat_max_ratio, flip, photometric distortion, ImageNet
normalisation, pad to the crop (labels padded with ignore 255). Every draw comes from the numpy
Generator passed in, so a sample's augmentation depends only on its seed."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

IGNORE_INDEX = 255
# ImageNet statistics on the 0-255 scale, as the release's segmentation configs (`EVA-01/seg`).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class AugSection:
    """Training augmentation; defaults are the release's EVA-g recipe (crop 896)."""

    crop_size: int = 896
    scale: list[int] = field(default_factory=lambda: [3584, 896])  # (long, short) side before the ratio
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75  # a crop's most frequent class may cover at most this share
    flip: float = 0.5
    photometric: bool = True


def check_aug_section(cfg: AugSection) -> None:
    if cfg.crop_size <= 0 or len(cfg.scale) != 2 or min(cfg.scale) <= 0:
        raise ValueError(f"aug.crop_size must be > 0 and aug.scale two positive sides, got {cfg}")
    if len(cfg.ratio_range) != 2 or not 0 < cfg.ratio_range[0] <= cfg.ratio_range[1]:
        raise ValueError(f"aug.ratio_range must be [low, high] with 0 < low <= high, got {cfg.ratio_range}")
    if not 0 < cfg.cat_max_ratio <= 1:
        raise ValueError(f"aug.cat_max_ratio must be in (0, 1], got {cfg.cat_max_ratio}")


def rescale_size(width: int, height: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long <= long_side and short <= short_side."""
    factor = min(long_side / max(width, height), short_side / min(width, height))
    return int(width * factor + 0.5), int(height * factor + 0.5)


def crop_box(height: int, width: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    top = int(rng.integers(0, max(height - crop, 0) + 1))
    left = int(rng.integers(0, max(width - crop, 0) + 1))
    return top, min(top + crop, height), left, min(left + crop, width)


def cat_max_crop(label: np.ndarray, crop: int, cat_max_ratio: float, rng: np.random.Generator) -> tuple:
    """mmseg RandomCrop: up to 10 boxes; keep the first whose largest class covers < cat_max_ratio of
    its labelled pixels (and that holds 2+ classes); else the last one drawn."""
    box = crop_box(*label.shape, crop, rng)
    if cat_max_ratio >= 1:
        return box
    for _ in range(10):
        top, bottom, left, right = box
        values, counts = np.unique(label[top:bottom, left:right], return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = crop_box(*label.shape, crop, rng)
    return box


def photometric_distortion(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """mmseg PhotoMetricDistortion on a float [3, H, W] image in 0-255: brightness +-32, contrast
    x[0.5, 1.5] (before or after the colour steps), saturation x[0.5, 1.5], hue +-18 of 180; each p=0.5.
    Saturation and hue use torchvision's RGB formulas instead of OpenCV's HSV (docs/segment.md)."""
    if rng.integers(2):
        image = (image + float(rng.uniform(-32, 32))).clamp(0, 255)
    contrast_first = bool(rng.integers(2))

    def contrast(img: torch.Tensor) -> torch.Tensor:
        return (img * float(rng.uniform(0.5, 1.5))).clamp(0, 255) if rng.integers(2) else img

    if contrast_first:
        image = contrast(image)
    unit = image / 255
    if rng.integers(2):
        unit = TF.adjust_saturation(unit, float(rng.uniform(0.5, 1.5))).clamp(0, 1)
    if rng.integers(2):
        unit = TF.adjust_hue(unit, int(rng.integers(-18, 19)) / 180)
    image = unit * 255
    if not contrast_first:
        image = contrast(image)
    return image


def normalize(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """RGB 0-255 (PIL, HWC array or CHW float tensor) -> ImageNet-normalised float [3, H, W]."""
    if not torch.is_tensor(image):
        image = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() - mean) / std


class TrainTransform:
    """(PIL image, uint8 label map, rng) -> (normalised image [3, crop, crop], long labels [crop, crop])."""

    def __init__(self, cfg: AugSection) -> None:
        check_aug_section(cfg)
        self.cfg = cfg

    def __call__(
        self, image: Image.Image, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        ratio = float(rng.uniform(*cfg.ratio_range))
        size = rescale_size(*image.size, cfg.scale[0] * ratio, cfg.scale[1] * ratio)
        image = image.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        top, bottom, left, right = cat_max_crop(label, cfg.crop_size, cfg.cat_max_ratio, rng)
        pixels = torch.from_numpy(np.array(image, dtype=np.float32)[top:bottom, left:right]).permute(2, 0, 1)
        labels = torch.from_numpy(label[top:bottom, left:right].astype(np.int64))
        if rng.random() < cfg.flip:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        if cfg.photometric:
            pixels = photometric_distortion(pixels, rng)
        return pad_pair(normalize(pixels), labels, cfg.crop_size)


def pad_pair(image: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to size x size: image with 0 (after normalisation), labels with ignore."""
    pad = (0, max(size - image.shape[-1], 0), 0, max(size - image.shape[-2], 0))
    return F.pad(image, pad, value=0.0), F.pad(labels, pad, value=IGNORE_INDEX)
