"""Training batches of (image, label map) pairs with the engine's stream protocol, so resume is exact.

Iteration-based, as mmseg trains: each rank reads an endless sequence of passes over the data;
pass k is a permutation seeded by (seed, k), cut into equal contiguous rank slices. An engine epoch
is `batches_per_epoch` batches of `batch_size` consecutive samples of that sequence (0 = one pass,
rounded down), so a recipe states iterations (steps_per_epoch x epochs) whatever the dataset size.
Batch b of an epoch belongs to logical worker b % N as its batch number b // N (`index`), as in
`flyeva.data.stream.ImageBatchStream`; each sample's augmentation is drawn from a generator seeded
by (seed, rank, its position in the rank's sequence). A pair that cannot be used (unreadable
image, missing or unreadable label, label of another size) makes its batch smaller, is counted in
`num_skipped` and named in a warning once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flyeva.data.sources import UnreadableImageError, UnreadableTargetError
from flyeva.data.stream import mix_seed
from flyeva.tasks.segment.data import SegmentationPairs
from flyeva.tasks.segment.transforms import TrainTransform

logger = logging.getLogger(__name__)
_TAG_SEGMENT = 11  # keeps these seeds apart from the image stream's


class SegmentationBatchStream(IterableDataset):
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
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skip: tuple[int, ...] = ()
        self.reported: set[str] = set()
        if self.samples_per_rank() == 0:
            raise ValueError(f"{len(source)} training pairs cannot feed {world_size} ranks; add data")
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(source)} pairs over {world_size} rank(s) give no batch of {batch_size}; "
                "lower train.batch_size, add data or set train.steps_per_epoch"
            )

    def samples_per_rank(self) -> int:
        return len(self.source) // self.world_size

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches per rank per epoch: `batches_per_epoch`, or the whole batches of one pass."""
        return self.batches_per_epoch or self.samples_per_rank() // self.batch_size

    def _source_index(self, position: int) -> int:
        """The source index at `position` of this rank's endless sequence of passes."""
        samples = self.samples_per_rank()
        passes, offset = divmod(position, samples)
        if passes != self._pass:
            generator = torch.Generator().manual_seed(mix_seed(_TAG_SEGMENT, self.seed, passes))
            order = torch.randperm(len(self.source), generator=generator)
            self._pass, self._order = passes, order[self.rank * samples : (self.rank + 1) * samples].tolist()
        return self._order[offset]

    def set_epoch(self, epoch: int, skip: Sequence[int] = ()) -> None:
        self.epoch = int(epoch)
        self.skip = tuple(int(count) for count in skip)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        skip = list(self.skip) or [0] * num_workers
        if len(skip) != num_workers:
            raise ValueError(
                f"set_epoch got skip for {len(skip)} workers but the loader runs {num_workers}; "
                "resume with the same num_workers as the interrupted run"
            )
        worker = (physical + sum(skip)) % num_workers
        self._pass, self._order = -1, []
        total = self.num_batches()
        epoch_start = self.epoch * total * self.batch_size
        for index in range(skip[worker], (total - worker + num_workers - 1) // num_workers):
            start = epoch_start + (worker + index * num_workers) * self.batch_size
            positions = range(start, start + self.batch_size)
            indices = [self._source_index(position) for position in positions]
            yield self._make_batch(indices, positions, worker, index)

    def _make_batch(self, indices: list[int], positions: range, worker: int, index: int) -> dict[str, Any]:
        images, labels = [], []
        for source_index, position in zip(indices, positions):
            try:
                image, label = self.source.load_pair(source_index)
            except (UnreadableImageError, UnreadableTargetError) as error:
                key = self.source.key(source_index)
                if key not in self.reported:
                    self.reported.add(key)
                    logger.warning("skipping %s: %s", key, error)
                continue
            rng = np.random.default_rng(mix_seed(_TAG_SEGMENT, self.seed, self.rank, position))
            pixels, target = self.transform(image, label, rng)
            images.append(pixels)
            labels.append(target)
        crop = self.transform.cfg.crop_size
        return {
            "images": torch.stack(images) if images else torch.empty(0, 3, crop, crop),
            "labels": torch.stack(labels) if labels else torch.empty(0, crop, crop, dtype=torch.long),
            "num_skipped": len(indices) - len(images),
            "worker": worker,
            "index": index,
        }
