"""Batches of decoded clips, with `ImageBatchStream`'s sharding, order and exact resume.

`ClipBatchStream` is `ImageBatchStream` whose samples are videos: decoding runs inside the
per-sample seeded section, so the TSN offsets and the augmentation of a clip depend only on its
place in the epoch (resume and any number of workers give the same clips). Batches are
`{"clips": [b, T, 3, S, S] (eval: [b, views x crops, T, 3, S, S]), "labels", "num_skipped",
"worker", "index"}`; an unreadable video is skipped, counted in `num_skipped` and named once in
the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flyeva.data.stream import ImageBatchStream, _PendingSample
from flyeva.tasks.classify.data import RankShard
from flyeva.tasks.video.datasets import VideoList
from flyeva.tasks.video.decode import VideoReadError
from flyeva.tasks.video.transforms import multi_view_indices, tsn_train_indices

logger = logging.getLogger(__name__)


class VideoSource:
    """An indexable source of sampled clips: `load(i)` decodes the frames the sampler picks for video i.

    Training draws the TSN offsets from torch's global RNG (seeded per sample by the stream);
    evaluation decodes every view's frames at once (views x num_frames, view-major).
    """

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


class _DecodeThenTransform:
    """Called by the stream inside its seeded section with the sample's loader: decode, then augment."""

    def __init__(self, transform: Callable[[np.ndarray], torch.Tensor], empty_shape: tuple[int, ...]):
        self.transform, self.empty_shape = transform, empty_shape

    def __call__(self, load: Callable[[], np.ndarray]) -> torch.Tensor:
        return self.transform(load())


class ClipBatchStream(ImageBatchStream):
    """`ImageBatchStream` over a `VideoSource`; see the module docstring."""

    def __init__(
        self, source: VideoSource | RankShard, transform: Callable, batch_size: int, empty_shape: tuple, **kw
    ):
        super().__init__(source, _DecodeThenTransform(transform, empty_shape), batch_size, **kw)
        if self.target_type is not int:
            raise ValueError("a ClipBatchStream needs a labelled VideoSource")

    def _make_batch(self, samples: list[_PendingSample], worker: int, index: int) -> dict[str, Any]:
        clips, labels = [], []
        for sample in samples:
            try:
                clip = self._transform_seeded(sample.load, sample.transform_seed)
            except VideoReadError as error:
                self._report("skipping video %s: %s", sample.key, error)
                continue
            clips.append(clip)
            labels.append(int(sample.load_target()))
        return {
            "clips": torch.stack(clips) if clips else torch.empty(0, *self.transform.empty_shape),
            "labels": torch.tensor(labels, dtype=torch.long),
            "num_skipped": len(samples) - len(clips),
            "worker": worker,
            "index": index,
        }


def eval_clip_stream(
    source: VideoSource, transform: Callable, batch_size: int, rank: int, world: int, empty_shape: tuple
):
    """This rank's share of an evaluation set (every video exactly once over all ranks)."""
    return ClipBatchStream(RankShard(source, rank, world), transform, batch_size, empty_shape)
