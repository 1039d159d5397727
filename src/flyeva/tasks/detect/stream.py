"""Batches of LSJ-transformed detection samples, resumable exactly as `flyeva.data.stream.ImageBatchStream`.

The same protocol as the shared stream (see its docstring): an IterableDataset with
`set_epoch(epoch, skip)` and `num_batches(num_workers)`; batch b of a rank belongs to logical
worker b % N as its batch b // N ("index"); an epoch is a permutation seeded by (seed, epoch),
cut into equal contiguous parts per rank; each sample's transform draws from torch's generator
seeded by (seed, epoch, position). With repeat factors (LVIS), an epoch's images are drawn by
stochastic rounding seeded by (seed, epoch), then cut or wrapped to the expected epoch length
round(sum of factors) so the schedule keeps a fixed number of steps.
Each batch: `images` uint8 [b, 3, S, S] (zero-padded), `image_sizes` long [b, 2], `targets` (one
dict of boxes / labels / masks per image), `image_ids`, `num_skipped`, `worker`, `index`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from flyeva.data.sources import UnreadableImageError
from flyeva.data.stream import mix_seed
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.lvis import repeated_indices
from flyeva.tasks.detect.transforms import LargeScaleJitter

logger = logging.getLogger(__name__)
_TAG_ORDER, _TAG_REPEAT, _TAG_TRANSFORM = 11, 12, 13


class DetectionBatchStream(IterableDataset):
    """One rank's share of each epoch as padded batches; see the module docstring."""

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
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.transform, self.batch_size = dataset, transform, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.repeat_factors = repeat_factors
        self.epoch, self.skip = 0, ()
        self._reported: set[int] = set()
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(dataset)} images cannot feed {world_size} ranks with batch_size={batch_size}; "
                "use more images, fewer ranks or a smaller batch"
            )

    def epoch_length(self) -> int:
        if self.repeat_factors is None:
            return len(self.dataset)
        return round(float(self.repeat_factors.sum()))

    def samples_per_rank(self) -> int:
        return self.epoch_length() // self.world_size

    def num_batches(self, num_workers: int = 0) -> int:
        """Whole batches per rank per epoch (a partial last batch is dropped), for any num_workers."""
        return self.samples_per_rank() // self.batch_size

    def set_epoch(self, epoch: int, skip: Sequence[int] = ()) -> None:
        self.epoch, self.skip = int(epoch), tuple(int(s) for s in skip)

    def epoch_order(self) -> np.ndarray:
        """The epoch's image indices, before the rank split."""
        rng = np.random.default_rng(mix_seed(_TAG_ORDER, self.seed, self.epoch))
        if self.repeat_factors is None:
            return rng.permutation(len(self.dataset))
        repeat_rng = np.random.default_rng(mix_seed(_TAG_REPEAT, self.seed, self.epoch))
        drawn = rng.permutation(repeated_indices(self.repeat_factors, repeat_rng))
        return np.resize(drawn, self.epoch_length())  # cut, or wrap around, to the fixed length

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        skip = list(self.skip) or [0] * num_workers
        if len(skip) != num_workers:
            raise ValueError(f"set_epoch got skip for {len(skip)} workers but the loader runs {num_workers}")
        worker = (physical + sum(skip)) % num_workers
        samples = self.samples_per_rank()
        start = self.rank * samples
        order = self.epoch_order()[start : start + samples]
        for index in range(skip[worker], self.num_batches() // num_workers + 1):
            batch = worker + index * num_workers
            if batch >= self.num_batches():
                return
            first = batch * self.batch_size
            positions = range(start + first, start + first + self.batch_size)
            yield self._make_batch(order[first : first + self.batch_size].tolist(), positions, worker, index)

    def _make_batch(self, indices: list[int], positions: range, worker: int, index: int) -> dict[str, Any]:
        samples, image_ids = [], []
        for image_index, position in zip(indices, positions):
            try:
                image = self.dataset.load_image(image_index)
            except UnreadableImageError as error:
                if image_index not in self._reported:
                    self._reported.add(image_index)
                    logger.warning("skipping image %s: %s", self.dataset.records[image_index].path, error)
                continue
            samples.append(self._transform_seeded(image_index, image, position))
            image_ids.append(self.dataset.records[image_index].image_id)
        side = self.transform.size
        images = torch.zeros(len(samples), 3, side, side, dtype=torch.uint8)
        for slot, sample in enumerate(samples):
            images[slot, :, : sample.image.shape[1], : sample.image.shape[2]] = sample.image
        return {
            "images": images,
            "image_sizes": torch.tensor([list(s.image.shape[1:]) for s in samples], dtype=torch.long).view(
                -1, 2
            ),
            "targets": [{"boxes": s.boxes, "labels": s.labels, "masks": s.masks} for s in samples],
            "image_ids": torch.tensor(image_ids, dtype=torch.long),
            "num_skipped": len(indices) - len(samples),
            "worker": worker,
            "index": index,
        }

    def _transform_seeded(self, image_index: int, image, position: int):
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(mix_seed(_TAG_TRANSFORM, self.seed, self.epoch, position))
        try:
            record = self.dataset.records[image_index]
            labels = np.array([i.label for i in record.instances], dtype=np.int64)
            return self.transform(image, self.dataset.masks(image_index), labels)
        finally:
            generator.set_state(state)
