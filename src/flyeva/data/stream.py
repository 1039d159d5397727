"""Batches of pretraining images with exact sharding across ranks/workers and exact resume.

`ImageBatchStream` is an IterableDataset that forms whole batches inside each DataLoader worker
(`build_loader`). Each item is `{"images": [b, 3, H, W], "num_skipped", "worker", "index"}`, plus
"keys", "ids" and "sources" with `return_ids=True`, and, when the source gives targets (for a
mixture: every child, all of one kind), the kept images' labels as "labels" (LongTensor [b]) or
captions as "texts" (list of str). Images and targets are read lazily (skipped batches on resume
read neither); a sample whose image or target cannot be read is skipped and counted in "num_skipped".

Batches. Every batch is cut from a fixed run of `batch_size` *raw* samples: an unreadable sample
makes its batch smaller instead of borrowing from the next one, so batch boundaries never depend
on decoding and resuming is exact. Batch b of a rank is logical worker b % N's batch b // N
("index"); the DataLoader takes batches from workers round-robin, so it yields b = 0, 1, 2, ...

Order of an epoch:
- indexable sources: one permutation of all N indices seeded by (seed, epoch); its first
  N - N % world_size entries are cut into world_size equal contiguous parts, one per rank, so every
  rank runs the same number of batches, whatever the number of workers;
- streaming sources (wds, `MixtureSource`): num_samples // world_size raw samples per rank, from
  `source.samples(stream, worker, num_workers, wrap)`. Without `num_samples` each worker reads its
  share once and `num_batches` is None (ranks may then differ: avoid under DDP).

Transform randomness: torch's CPU generator is seeded per sample from (seed, epoch, position in
the epoch permutation) for indexable sources, (seed, epoch, rank, worker, position) for streaming
ones, and restored afterwards.

Resume: `set_epoch(epoch, skip)` with skip[w] = 1 + the last "index" consumed from worker w.
Skipped batches are not decoded. The resumed loader's physical worker p runs logical worker
(p + sum(skip)) % N, so it yields the remaining batches in the original order; the number of
workers must not change.

Task streams subclass it and may change the epoch (`samples_per_rank`, `num_batches`), the order
(`rank_order`), the per-sample seed (`sample_seed`), how one sample is read (`decode`) and how the
kept samples become a batch (`collate`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flyeva.data.sources.base import (
    DEFAULT_MAX_PIXELS,
    TAG_STREAM_TRANSFORM,
    TAG_TRANSFORM,
    PendingSample,
    UnreadableImageError,
    UnreadableTargetError,
    is_indexable,
    mix_seed,
    stream_target_type,
)

logger = logging.getLogger(__name__)


class ImageBatchStream(IterableDataset):
    """Decoded, transformed batches of one rank's share of each epoch; see the module docstring."""

    transform_tag = TAG_TRANSFORM  # a task stream's own tag keeps its crops apart from pretraining's

    def __init__(
        self,
        source: Any,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        return_ids: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not (is_indexable(source) or hasattr(source, "samples")):
            raise TypeError(f"unsupported source {type(source).__name__}; build one with flyeva.data.sources")
        self.source, self.transform, self.batch_size, self.seed = source, transform, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.max_pixels, self.return_ids = max_pixels, return_ids
        self.epoch, self.skip = 0, ()
        self.target_type = stream_target_type(source)
        self._reported: set[str] = set()
        self.check_epoch_size()

    def check_epoch_size(self) -> None:
        """Reject a source too small to give every rank a batch (a task stream words it its own way)."""
        samples = self.samples_per_rank()
        if samples == 0:
            raise ValueError(
                f"the source has fewer samples than world_size={self.world_size}, so ranks would get none; "
                f"use a larger source (or samples_per_epoch/num_samples) or fewer ranks"
            )
        if self.num_batches() == 0:
            raise ValueError(
                f"each rank gets {samples} samples, fewer than batch_size={self.batch_size}, and "
                f"drop_last=True drops them all; lower batch_size or set drop_last=False"
            )

    @property
    def classes(self) -> list[str] | None:
        """The source's class names (index = label), or None when it has none."""
        return getattr(self.source, "classes", None)

    def set_epoch(self, epoch: int, skip: Sequence[int] = ()) -> None:
        """Select the epoch and, to resume, how many batches each logical worker already gave.
        Call it before `iter(loader)`: workers copy the stream when the iterator starts."""
        if any(int(count) < 0 for count in skip):
            raise ValueError(f"skip counts must be non-negative, got {list(skip)}")
        self.epoch = int(epoch)
        self.skip = tuple(int(count) for count in skip)

    def samples_per_rank(self) -> int | None:
        """Raw samples each rank reads per epoch, or None for a streaming source without num_samples."""
        total = len(self.source) if is_indexable(self.source) else self.source.num_samples
        return None if total is None else total // self.world_size

    def num_batches(self, num_workers: int = 0) -> int | None:
        """Batches per rank per epoch (the same for any num_workers), or None when unknown."""
        samples = self.samples_per_rank()
        if samples is None:
            return None
        return samples // self.batch_size if self.drop_last else -(-samples // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        skip = list(self.skip) or [0] * num_workers
        if len(skip) != num_workers:
            raise ValueError(
                f"set_epoch got skip for {len(skip)} workers but the loader runs {num_workers}; "
                f"resume with the same num_workers as the interrupted run"
            )
        worker = (physical + sum(skip)) % num_workers
        for index, samples in self._worker_batches(worker, num_workers, first_index=skip[worker]):
            yield self._make_batch(samples, worker, index)

    def _batch_sizes(self, worker: int, num_workers: int) -> Iterator[int]:
        """Raw sample counts of this worker's batches, index 0, 1, ... (for a known epoch length)."""
        samples, total_batches = self.samples_per_rank(), self.num_batches()
        for batch in range(worker, total_batches, num_workers):
            yield min(self.batch_size, samples - batch * self.batch_size)

    def _worker_batches(
        self, worker: int, num_workers: int, first_index: int
    ) -> Iterator[tuple[int, list[PendingSample]]]:
        if is_indexable(self.source):
            yield from self._indexable_batches(worker, num_workers, first_index)
            return
        raw = self._stream_samples(worker, num_workers)
        known = self.samples_per_rank() is not None  # else one pass over this worker's share
        sizes = self._batch_sizes(worker, num_workers) if known else itertools.repeat(self.batch_size)
        for index, size in enumerate(sizes):
            chunk = list(itertools.islice(raw, size))  # read (not decoded) even when skipped
            if not known and (not chunk or (self.drop_last and len(chunk) < size)):
                return
            if index >= first_index:
                yield index, chunk

    def _indexable_batches(
        self, worker: int, num_workers: int, first_index: int
    ) -> Iterator[tuple[int, list[PendingSample]]]:
        rank_order, targets = self.rank_order(), self.target_type is not None
        batch_sizes = self._batch_sizes(worker, num_workers)
        for index, size in enumerate(itertools.islice(batch_sizes, first_index, None), start=first_index):
            start = (worker + index * num_workers) * self.batch_size
            chunk = []
            for offset, source_index in enumerate(rank_order[start : start + size].tolist(), start=start):
                load = functools.partial(self.source.load, source_index, self.max_pixels)
                load_target = functools.partial(self.source.target, source_index) if targets else None
                seed = self.sample_seed(offset)
                chunk.append(
                    PendingSample(self.source.key(source_index), source_index, 0, seed, load, load_target)
                )
            yield index, chunk

    def rank_order(self) -> Any:
        """This rank's source indices for the epoch, in batch order (a tensor or array; indexable sources)."""
        return rank_permutation(len(self.source), self.seed, self.epoch, self.rank, self.world_size)

    def sample_seed(self, offset: int) -> int:
        """The transform seed of the sample at `offset` in this rank's epoch: its place in the permutation."""
        position = self.rank * self.samples_per_rank() + offset
        return mix_seed(self.transform_tag, self.seed, self.epoch, position)

    def _stream_samples(self, worker: int, num_workers: int) -> Iterator[PendingSample]:
        """This worker's raw samples from a streaming source, lazily, in order."""
        wrap = self.samples_per_rank() is not None  # an epoch of known length starts the worker's data again
        for position, sample in enumerate(self.source.samples(self, worker, num_workers, wrap)):
            seed = mix_seed(TAG_STREAM_TRANSFORM, self.seed, self.epoch, self.rank, worker, position)
            yield dataclasses.replace(sample, transform_seed=seed)

    def _make_batch(self, samples: list[PendingSample], worker: int, index: int) -> dict[str, Any]:
        kept, items = [], []
        for sample in samples:
            item = self.decode(sample)
            if item is not None:
                kept.append(sample)
                items.append(item)
        batch = self.collate(kept, items)
        batch.update(num_skipped=len(samples) - len(kept), worker=worker, index=index)
        return batch

    def decode(self, sample: PendingSample) -> Any | None:
        """One sample's (image, target), or None (named once in the log) when it cannot be read."""
        try:
            # The target first: it is cheap, and a bad pair then costs no image decode.
            target = sample.load_target() if sample.load_target is not None else None
        except UnreadableTargetError as error:
            self.report_skip("skipping sample %s: %s", sample.key, error)
            return None
        try:
            image = sample.load()
        except UnreadableImageError as error:
            self.report_skip("skipping image %s: %s", sample.key, error)
            return None
        return seeded_call(sample.transform_seed, self.transform, image), target

    def collate(self, kept: list[PendingSample], items: list[Any]) -> dict[str, Any]:
        """The batch's entries from the kept samples and what `decode` made of them."""
        images, targets = [image for image, _ in items], [target for _, target in items]
        size = getattr(self.transform, "image_size", None)  # the shape of an empty batch, when known
        empty = torch.empty(0, 3, size, size) if isinstance(size, int) else torch.empty(0)
        batch: dict[str, Any] = {"images": torch.stack(images) if images else empty}
        if self.target_type is int:
            batch["labels"] = torch.tensor([int(label) for label in targets], dtype=torch.long)
        elif self.target_type is str:
            batch["texts"] = [str(text) for text in targets]
        if self.return_ids:
            batch["keys"] = [sample.key for sample in kept]
            batch["ids"] = torch.tensor([sample.index for sample in kept], dtype=torch.long)
            batch["sources"] = torch.tensor([sample.source_id for sample in kept], dtype=torch.long)
        return batch

    def report_skip(self, message: str, key: str, error: Exception) -> None:
        if key not in self._reported:  # once per sample, not once per epoch
            self._reported.add(key)
            logger.warning(message, key, error)


def seeded_call(seed: int, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` with torch's CPU generator seeded by `seed`: its draws depend on the sample only."""
    # Only the CPU generator is seeded and restored: the caller's RNG (and CUDA's) stay untouched.
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return function(*args)
    finally:
        generator.set_state(state)


def rank_permutation(
    length: int, seed: int, epoch: int, rank: int, world_size: int, tag: int | None = None
) -> torch.Tensor:
    """This rank's slice of the epoch's permutation of an indexable source (the N % world tail dropped);
    a task stream passes its own `tag` to draw permutations of its own."""
    samples = length // world_size
    key = (seed, epoch) if tag is None else (tag, seed, epoch)
    generator = torch.Generator().manual_seed(mix_seed(*key))
    return torch.randperm(length, generator=generator)[rank * samples : (rank + 1) * samples].clone()


def build_loader(
    stream: Any,
    num_workers: int,
    *,
    seed: int | None = None,
    worker_init_fn: Any = None,
) -> DataLoader:
    """The one DataLoader over whole batches from a stream (training, features, evaluation).

    in_order=True keeps batches in order 0, 1, 2, ... (so resume is exact); the workers' base seed
    comes from a private generator, so creating the loader leaves the global RNG alone.
    """
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2 if num_workers > 0 else None,
        in_order=True,
        generator=torch.Generator().manual_seed(stream.seed if seed is None else seed),
        worker_init_fn=worker_init_fn,
    )
