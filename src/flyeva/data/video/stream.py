"""Batches of decoded clips, with `ImageBatchStream`'s sharding, order and exact resume.

Decoding runs inside the per-sample seeded section, so a clip's TSN offsets and augmentation depend
only on its place in the epoch. Batches are `{"clips": [b, T, 3, S, S] (eval: [b, views x crops, T,
3, S, S]), "labels", "num_skipped", "worker", "index"}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flyeva.data.sharding import RankShard
from flyeva.data.stream import ImageBatchStream, PendingSample, seeded_call
from flyeva.data.video.datasets import VideoList
from flyeva.data.video.decode import VideoReadError
from flyeva.data.video.transforms import multi_view_indices, tsn_train_indices


class VideoSource:
    """An indexable source of sampled clips: `load(i)` decodes the frames the sampler picks for video i
    (training: TSN offsets from torch's RNG; evaluation: every view's frames at once, view-major)."""

    target_type = int

    def __init__(
        self, videos: VideoList, decoder: Any, num_frames: int, short_side: int, train: bool, views: int = 1
    ):
        self.videos, self.decoder = videos, decoder
        self.num_frames, self.short_side, self.train, self.views = num_frames, short_side, train, views
        self.classes = videos.classes

    def __len__(self) -> int:
        return len(self.videos)

    def key(self, index: int) -> str:
        return self.videos.paths[index]

    def target(self, index: int) -> int:
        return self.videos.labels[index]

    def choose(self, num_frames: int) -> list[int]:
        if self.train:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            return tsn_train_indices(num_frames, self.num_frames, rng)
        return multi_view_indices(num_frames, self.num_frames, self.views)

    def load(self, index: int, max_pixels: int | None = None) -> np.ndarray:
        return self.decoder.read(self.videos.paths[index], self.choose, self.short_side)


class ClipBatchStream(ImageBatchStream):
    """`ImageBatchStream` over a `VideoSource`; see the module docstring."""

    def __init__(
        self, source: VideoSource | RankShard, transform: Callable, batch_size: int, empty_shape: tuple, **kw
    ):
        super().__init__(source, transform, batch_size, **kw)
        self.empty_shape = empty_shape
        if self.target_type is not int:
            raise ValueError("a ClipBatchStream needs a labelled VideoSource")

    def decode(self, sample: PendingSample) -> tuple[torch.Tensor, int] | None:
        try:
            # Decoding runs seeded too: the TSN offsets are drawn from torch's generator.
            clip = seeded_call(sample.transform_seed, lambda: self.transform(sample.load()))
        except VideoReadError as error:
            self.report_skip("skipping video %s: %s", sample.key, error)
            return None
        return clip, int(sample.load_target())

    def collate(self, kept: list[PendingSample], items: list[Any]) -> dict[str, Any]:
        return {
            "clips": torch.stack([clip for clip, _ in items]) if items else torch.empty(0, *self.empty_shape),
            "labels": torch.tensor([label for _, label in items], dtype=torch.long),
        }


def eval_clip_stream(
    source: VideoSource, transform: Callable, batch_size: int, rank: int, world: int, empty_shape: tuple
):
    """This rank's share of an evaluation set (every video exactly once over all ranks)."""
    return ClipBatchStream(RankShard(source, rank, world), transform, batch_size, empty_shape)
