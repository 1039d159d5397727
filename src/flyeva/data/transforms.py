"""Image transforms: EVA's MIM pretraining augmentation and a resize/centre-crop for evaluation.

Pretraining (docs/recipes.md §3, "Augmentation"): one crop feeds both the student and the CLIP
teacher. Randomness comes from torch's global RNG, which `ImageBatchStream` seeds per sample.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

# OpenAI CLIP's normalisation, used by pretraining, classification and CLIP (docs/recipes.md §3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ImageNet's, used by detection and segmentation (docs/recipes.md §9, pitfalls).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PretrainTransform:
    """PIL image -> normalised float tensor [3, image_size, image_size] for MIM pretraining."""

    def __init__(
        self,
        image_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        self.image_size = image_size
        # Flip before crop, as in the release's DataAugmentationForEVA; the order does not change the law.
        self.pipeline = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(hflip),
                transforms.RandomResizedCrop(
                    image_size, scale=scale, ratio=ratio, interpolation=InterpolationMode.BICUBIC
                ),
                transforms.ToTensor(),
                transforms.Normalize(CLIP_MEAN, CLIP_STD),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def __repr__(self) -> str:
        return f"PretrainTransform({self.pipeline})"


class EvalTransform:
    """Resize the short side to image_size / crop_pct (bicubic), centre-crop image_size, normalise.

    crop_pct defaults to 1.0, the value of timm's configs for EVA's fine-tuned models.
    """

    def __init__(
        self,
        image_size: int = 224,
        crop_pct: float = 1.0,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.image_size = image_size
        self.pipeline = transforms.Compose(
            [
                transforms.Resize(int(image_size / crop_pct), interpolation=InterpolationMode.BICUBIC),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def __repr__(self) -> str:
        return f"EvalTransform({self.pipeline})"


@contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and NumPy's global RNGs (timm's augmentations and Mixup draw from them), then
    restore them, so a seeded draw leaves every other user of those RNGs where it was."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
