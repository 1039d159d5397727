"""`type: wds`: local webdataset tar shards, streamed: the stream deals shards to (rank, worker) slots.

The shard list is permuted by (seed, epoch) and dealt to the world_size * num_workers slots, slot =
rank * num_workers + worker. With `num_samples`, a rank's epoch is num_samples // world_size raw
samples; each worker reads its shards front to back, starting again at its first shard if they
run out (webdataset's `with_epoch` semantics: every sample is read once per epoch when the slots'
shards hold exactly the samples their batches need). Without it each worker reads its shards once
and the epoch length is unknown.
"""

import functools
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import (
    IMAGE_EXTENSIONS,
    TAG_SHARDS,
    PendingSample,
    UnreadableImageError,
    UnreadableTargetError,
    clean_caption,
    decode_rgb,
    mix_seed,
)

# webdataset target members: "cls" holds an integer class label, "txt" a caption (webdataset's conventions).
WDS_TARGET_TYPES: dict[str, type] = {"cls": int, "txt": str}
# A shard that ends early (a truncated upload) must not stop training: its tail is skipped.
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError)

logger = logging.getLogger(__name__)


def _expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(urls, str | os.PathLike):
        text = os.fspath(urls)
        if os.path.isdir(text):  # a folder of shards
            return sorted(str(path) for path in Path(text).glob("*.tar"))
        return expand_urls(text)
    return [os.fspath(url) for url in urls]


def _pick_image(members: dict[str, bytes]) -> bytes | None:
    return next((members[ext[1:]] for ext in IMAGE_EXTENSIONS if ext[1:] in members), None)


def _no_image_member(key: str) -> NoReturn:
    raise UnreadableImageError(f"webdataset sample {key} has no image member ({', '.join(IMAGE_EXTENSIONS)})")


class WebDatasetSource:
    """Local webdataset tar shards; each sample's first member with an image extension is its image.

    `urls` is a list of paths, one path, a folder of `*.tar`, or a brace pattern such as
    `shards/train-{000000..000127}.tar`. `target_key` "cls" reads integer labels, "txt" captions.
    """

    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        num_samples: int | None = None,
        target_key: str | None = None,
    ):
        if target_key is not None and target_key not in WDS_TARGET_TYPES:
            raise ValueError(
                f"target_key must be one of {sorted(WDS_TARGET_TYPES)} or None, got {target_key!r}: "
                f"'cls' for integer labels, 'txt' for captions"
            )
        self.target_key = target_key
        self.target_type: type | None = WDS_TARGET_TYPES.get(target_key) if target_key else None
        self.shards = _expand_shards(urls)
        missing = [shard for shard in self.shards if not os.path.isfile(shard)]
        if not self.shards or len(missing) == len(self.shards):
            raise FileNotFoundError(
                f"no webdataset shards found for {urls!r}; pass local .tar files as a list, a folder, "
                f"or a brace pattern like 'shards/train-{{000..127}}.tar' that matches existing files"
            )
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(self.shards)} shards for {urls!r} do not exist "
                f"(first: {missing[0]}); fix the pattern's range or write the missing shards"
            )
        if num_samples is not None and num_samples <= 0:
            raise ValueError(f"num_samples must be positive or None, got {num_samples}")
        self.num_samples = num_samples

    def iter_shard(self, shard: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
        """(key, image bytes, target member bytes) of each sample of one shard; None for a missing member."""
        current_key: str | None = None
        members: dict[str, bytes] = {}
        with open(shard, "rb") as stream:
            for member in tar_file_iterator(stream):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, _pick_image(members), members.get(self.target_key)
                    current_key, members = key, {}
                members[suffix.lower()] = member["data"]
        if current_key is not None:
            yield current_key, _pick_image(members), members.get(self.target_key)

    def parse_target(self, key: str, data: bytes | None) -> int | str:
        """The label or caption of sample `key` from its target member, or `UnreadableTargetError`."""
        if data is None:
            raise UnreadableTargetError(f"webdataset sample {key} has no .{self.target_key} member")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise UnreadableTargetError(f".{self.target_key} member is not utf-8 ({error})") from error
        if self.target_type is str:
            return clean_caption(text, f".txt member of {key}")
        try:
            label = int(text)
        except ValueError:
            label = -1
        if label < 0:
            raise UnreadableTargetError(f".cls member holds {text[:40]!r}, not a non-negative integer")
        return label

    def samples(self, stream: Any, worker: int, num_workers: int, wrap: bool) -> Iterator[PendingSample]:
        """The worker's shards front to back, again and again when `wrap` (an epoch of known length)."""
        slot, slots = stream.rank * num_workers + worker, stream.world_size * num_workers
        generator = torch.Generator().manual_seed(mix_seed(TAG_SHARDS, stream.seed, stream.epoch))
        order = torch.randperm(len(self.shards), generator=generator).tolist()
        shards = [self.shards[i] for i in order[slot::slots]]
        if not shards:
            if not wrap:
                return
            raise ValueError(
                f"{len(self.shards)} webdataset shards cannot feed {stream.world_size} ranks x {num_workers} "
                f"workers: write at least {slots} shards or use fewer workers"
            )
        while True:
            produced = 0
            for shard in shards:
                for key, data, target_data in self._read_shard(shard):
                    produced += 1
                    load = functools.partial(_no_image_member, key)
                    if data is not None:
                        load = functools.partial(decode_rgb, data, stream.max_pixels)
                    parse = functools.partial(self.parse_target, key, target_data)
                    load_target = parse if stream.target_type is not None else None
                    yield PendingSample(key, -1, 0, 0, load, load_target)
            if not wrap:
                return
            if produced == 0:
                raise ValueError(
                    f"webdataset shards {shards} hold no samples; check that they are valid tars"
                )

    def _read_shard(self, shard: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
        count = 0
        try:
            for sample in self.iter_shard(shard):
                count += 1
                yield sample
        except SHARD_READ_ERRORS as error:  # a damaged shard costs its tail, not the run
            logger.warning(
                "webdataset shard %s unreadable after %d samples (%s); skipped rest", shard, count, error
            )


@register("wds", keys=("path", "num_samples", "target"), targets=("label", "caption"), streams=True)
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> WebDatasetSource:
    member = config.target or {"label": "cls", "caption": "txt"}.get(target or "")
    return WebDatasetSource(config.path, num_samples=config.num_samples or None, target_key=member)
