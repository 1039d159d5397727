"""Batches of LSJ-transformed detection samples: `flyeva.data.stream.ImageBatchStream` over COCO images.

An epoch is a permutation seeded by (seed, epoch), cut into equal contiguous parts per rank. With
repeat factors (LVIS) its images are drawn by stochastic rounding, then cut or wrapped to
round(sum of factors) so the schedule keeps a fixed number of steps. Each batch: `images` uint8
[b, 3, S, S] (zero-padded), `image_sizes` long [b, 2], `targets` (boxes / labels / masks per image;
no masks for a box-only detector), `image_ids`, `num_skipped`, `worker`, `index`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flyeva.data.sources import UnreadableImageError
from flyeva.data.stream import ImageBatchStream, PendingSample, mix_seed, seeded_call
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.lvis import repeated_indices
from flyeva.tasks.detect.transforms import LargeScaleJitter

_TAG_ORDER, _TAG_REPEAT, _TAG_TRANSFORM = 11, 12, 13


class DetectionBatchStream(ImageBatchStream):
    """One rank's share of each epoch as padded batches; see the module docstring."""

    transform_tag = _TAG_TRANSFORM

    def __init__(
        self,
        dataset: CocoDetectionDataset,
        transform: LargeScaleJitter,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        repeat_factors: np.ndarray | None = None,
    ):
        self.dataset, self.repeat_factors = dataset, repeat_factors
        super().__init__(dataset, transform, batch_size, rank, world_size, seed, drop_last=True)

    def check_epoch_size(self) -> None:
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(self.dataset)} images cannot feed {self.world_size} ranks with "
                f"batch_size={self.batch_size}; use more images, fewer ranks or a smaller batch"
            )

    def epoch_length(self) -> int:
        if self.repeat_factors is None:
            return len(self.dataset)
        return round(float(self.repeat_factors.sum()))

    def samples_per_rank(self) -> int:
        return self.epoch_length() // self.world_size

    def epoch_order(self) -> np.ndarray:
        """The epoch's image indices, before the rank split."""
        rng = np.random.default_rng(mix_seed(_TAG_ORDER, self.seed, self.epoch))
        if self.repeat_factors is None:
            return rng.permutation(len(self.dataset))
        repeat_rng = np.random.default_rng(mix_seed(_TAG_REPEAT, self.seed, self.epoch))
        drawn = rng.permutation(repeated_indices(self.repeat_factors, repeat_rng))
        return np.resize(drawn, self.epoch_length())  # cut, or wrap around, to the fixed length

    def rank_order(self) -> np.ndarray:
        samples = self.samples_per_rank()
        return self.epoch_order()[self.rank * samples : (self.rank + 1) * samples]

    def decode(self, sample: PendingSample) -> Any | None:
        try:
            image = sample.load()
        except UnreadableImageError as error:
            self.report_skip("skipping image %s: %s", sample.key, error)
            return None
        labels = np.array([i.label for i in self.dataset.records[sample.index].instances], dtype=np.int64)
        if not self.dataset.with_masks:  # a box-only detector: the boxes themselves are transformed
            boxes = self.dataset.boxes(sample.index)
            return seeded_call(sample.transform_seed, self.transform, image, None, labels, boxes)
        masks = self.dataset.masks(sample.index)
        return seeded_call(sample.transform_seed, self.transform, image, masks, labels)

    def collate(self, kept: list[PendingSample], items: list[Any]) -> dict[str, Any]:
        side = self.transform.size
        images = torch.zeros(len(items), 3, side, side, dtype=torch.uint8)
        for slot, item in enumerate(items):
            images[slot, :, : item.image.shape[1], : item.image.shape[2]] = item.image
        sizes = [list(item.image.shape[1:]) for item in items]
        image_ids = [self.dataset.records[sample.index].image_id for sample in kept]
        return {
            "images": images,
            "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
            "targets": [
                {"boxes": s.boxes, "labels": s.labels} | ({"masks": s.masks} if s.masks is not None else {})
                for s in items
            ],
            "image_ids": torch.tensor(image_ids, dtype=torch.long),
        }
