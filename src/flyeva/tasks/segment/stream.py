"""Training batches of (image, label map) pairs: `flyeva.data.stream.ImageBatchStream` over endless passes.

Iteration-based, as mmseg trains: each rank reads an endless sequence of passes over the data;
pass k is a permutation seeded by (seed, k), cut into equal contiguous rank slices. An engine epoch
is `batches_per_epoch` batches of `batch_size` consecutive samples of that sequence (0 = one pass,
rounded down), so a recipe states iterations (steps_per_epoch x epochs) whatever the dataset size.
Workers, skip counts and resume are the shared stream's; each sample's augmentation is drawn from a
generator seeded by (seed, rank, its position in the rank's sequence). A pair that cannot be used
(unreadable image, missing or unreadable label, label of another size) makes its batch smaller, is
counted in `num_skipped` and named in a warning once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from flyeva.data.sources import UnreadableImageError, UnreadableTargetError
from flyeva.data.stream import ImageBatchStream, PendingSample, mix_seed, rank_permutation
from flyeva.tasks.segment.data import SegmentationPairs
from flyeva.tasks.segment.transforms import TrainTransform

_TAG_SEGMENT = 11  # keeps these seeds apart from the image stream's


class SegmentationBatchStream(ImageBatchStream):
    """Batches {"images" [b, 3, c, c], "labels" [b, c, c], "num_skipped", "worker", "index"}."""

    def __init__(
        self,
        source: SegmentationPairs,
        transform: TrainTransform,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batches_per_epoch: int = 0,
    ) -> None:
        self.batches_per_epoch = batches_per_epoch
        super().__init__(source, transform, batch_size, rank, world_size, seed, drop_last=True)

    def check_epoch_size(self) -> None:
        pairs, world = len(self.source), self.world_size
        if self._pass_length() == 0:
            raise ValueError(f"{pairs} training pairs cannot feed {world} ranks; add data")
        if self.num_batches() == 0:
            raise ValueError(
                f"{pairs} pairs over {world} rank(s) give no batch of {self.batch_size}; "
                "lower train.batch_size, add data or set train.steps_per_epoch"
            )

    def _pass_length(self) -> int:
        return len(self.source) // self.world_size

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches per rank per epoch: `batches_per_epoch`, or the whole batches of one pass."""
        return self.batches_per_epoch or self._pass_length() // self.batch_size

    def samples_per_rank(self) -> int:
        return self.num_batches() * self.batch_size

    def rank_order(self) -> torch.Tensor:
        """This epoch's stretch of the rank's endless sequence of passes."""
        length, per_pass = self.samples_per_rank(), self._pass_length()
        start = self.epoch * length
        first, last = start // per_pass, (start + length - 1) // per_pass
        passes = [
            rank_permutation(len(self.source), self.seed, k, self.rank, self.world_size, tag=_TAG_SEGMENT)
            for k in range(first, last + 1)
        ]
        return torch.cat(passes)[start - first * per_pass :][:length]

    def sample_seed(self, offset: int) -> int:
        return mix_seed(_TAG_SEGMENT, self.seed, self.rank, self.epoch * self.samples_per_rank() + offset)

    def decode(self, sample: PendingSample) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            image, label = sample.load()
        except (UnreadableImageError, UnreadableTargetError) as error:
            self.report_skip("skipping %s: %s", sample.key, error)
            return None
        return self.transform(image, label, np.random.default_rng(sample.transform_seed))

    def collate(self, kept: list[PendingSample], items: list[Any]) -> dict[str, Any]:
        crop = self.transform.cfg.crop_size
        if not items:
            return {"images": torch.empty(0, 3, crop, crop), "labels": torch.empty(0, crop, crop).long()}
        images, labels = zip(*items)
        return {"images": torch.stack(images), "labels": torch.stack(labels)}
