"""LVIS long-tail training: sigmoid classification with the federated loss, and repeat-factor sampling.

Release `EVA-01/det` on LVIS v1 follows detectron2: the federated loss (Zhou et al. 2021) scores
each RoI against the image's ground-truth classes plus negatives sampled in proportion to
image_count^0.5, 50 classes in all; repeat-factor sampling (Gupta et al. 2019) repeats an image
max(1, sqrt(t / f(c))) times for its rarest category c, t = 0.001.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

FED_LOSS_CLASSES = 50  # release `EVA-01/det` (detectron2 default)
FED_LOSS_POWER = 0.5  # weights image_count ** 0.5
REPEAT_THRESHOLD = 0.001


def fed_loss_weights(image_counts: Sequence[int], power: float = FED_LOSS_POWER) -> torch.Tensor:
    """Sampling weight of each class for the federated loss: image_count ** power.

    A negative or non-finite count is refused: its NaN weight would garble every later negative draw.
    """
    counts = torch.tensor([float(count) for count in image_counts], dtype=torch.float64)
    bad = (~torch.isfinite(counts) | (counts < 0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"image_count of class {bad[0]} is {counts[bad[0]].item()} ({len(bad)} bad in all); "
            "counts of images must be finite and >= 0: fix the categories' image_count in the annotation file"
        )
    return counts.to(torch.float32) ** power


def fed_loss_classes(
    gt_classes: torch.Tensor,
    num_classes: int,
    weights: torch.Tensor,
    num_sampled: int = FED_LOSS_CLASSES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The classes the loss covers: every ground-truth class, then negatives drawn by `weights`
    (detectron2 `get_fed_loss_classes`; background, index num_classes, is never drawn)."""
    present = torch.unique(gt_classes)
    present = present[present < num_classes]
    if len(present) >= num_sampled:
        return present
    prob = weights.to(torch.float32).clone()
    prob[present] = 0
    count = min(num_sampled - len(present), int((prob > 0).sum()))
    if count == 0:  # no class with images is left to draw (one class, or all counts zero)
        return present
    sampled = torch.multinomial(prob, count, replacement=False, generator=generator)
    return torch.cat([present, sampled.to(present.device)])


def sigmoid_ce_loss(
    logits: torch.Tensor,
    gt_classes: torch.Tensor,
    fed_weights: torch.Tensor | None = None,
    num_sampled: int = FED_LOSS_CLASSES,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-class BCE over the K foreground logits of [N, K + 1] (background = all zeros), / N; with
    `fed_weights` only the federated classes count (detectron2 `sigmoid_cross_entropy_loss`)."""
    count, num_classes = logits.shape[0], logits.shape[1] - 1
    if count == 0:
        return logits.sum() * 0.0
    target = F.one_hot(gt_classes, num_classes + 1).to(logits.dtype)[:, :num_classes]
    loss = F.binary_cross_entropy_with_logits(logits[:, :num_classes], target, reduction="none")
    if fed_weights is not None:
        classes = fed_loss_classes(gt_classes, num_classes, fed_weights, num_sampled, generator)
        mask = torch.zeros(num_classes, dtype=loss.dtype, device=loss.device)
        mask[classes.to(loss.device)] = 1
        loss = loss * mask
    return loss.sum() / count


def repeat_factors(
    image_categories: Sequence[Sequence[int]], threshold: float = REPEAT_THRESHOLD
) -> np.ndarray:
    """Per-image repeat factor r(I) = max over its categories c of max(1, sqrt(t / f(c))), f(c) the
    fraction of training images in which c appears; an image without annotations has r = 1."""
    num_images = len(image_categories)
    counts = Counter(category for categories in image_categories for category in set(categories))
    category_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in counts.items()}
    return np.array(
        [max((category_factor[c] for c in set(cats)), default=1.0) for cats in image_categories],
        dtype=np.float64,
    )


def repeated_indices(factors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One epoch's image indices: image i appears floor(r_i) times, plus once with prob frac(r_i)."""
    whole = np.floor(factors)
    extra = rng.random(len(factors)) < (factors - whole)
    return np.repeat(np.arange(len(factors)), (whole + extra).astype(np.int64))
