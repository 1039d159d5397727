"""What every source shares (decoding, finding images, read errors, seeds), and sources made of sources:
a split listed as several (`ConcatSource`), a pick (`SourceSubset`), a weighted mixture (`MixtureSource`)."""

from __future__ import annotations

import bisect
import dataclasses
import functools
import io
import itertools
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# Training images above this are decoded smaller (JPEG draft mode) or skipped and counted: 40 MP is
# far above any training set's images, while PIL's own bomb limit (179 MP) allows 1.3 GB per image.
DEFAULT_MAX_PIXELS = 40_000_000
# Tags keep the seeds of different random streams apart when their other inputs coincide.
TAG_TRANSFORM, TAG_STREAM_TRANSFORM, TAG_SHARDS, TAG_MIXTURE, TAG_CHILD = range(1, 6)
_MASK64 = (1 << 64) - 1

logger = logging.getLogger(__name__)


class UnreadableImageError(Exception):
    """An image that cannot be used: empty, not an image, truncated, or too large. str() = reason."""


class UnreadableTargetError(Exception):
    """A label or caption that is missing, empty or cannot be parsed. str() = reason."""


def decode_rgb(data: bytes | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image, or raise `UnreadableImageError`; the
    pixel count is checked from the header, before any pixel is decoded."""
    if isinstance(data, bytes | bytearray):
        if len(data) == 0:
            raise UnreadableImageError("zero-byte image")
        file: Any = io.BytesIO(data)
    else:
        try:
            if os.path.getsize(data) == 0:
                raise UnreadableImageError("zero-byte file")
        except OSError as error:
            raise UnreadableImageError(f"cannot read file ({error.strerror})") from error
        file = data
    try:
        # Our own max_pixels check below replaces PIL's warning; PIL's hard error still applies.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(file)
    except Image.DecompressionBombError as error:
        raise UnreadableImageError(f"too many pixels for PIL's decompression-bomb limit ({error})") from error
    except Exception as error:  # untrusted bytes: PIL plugins raise many exception types
        raise UnreadableImageError(f"not a readable image ({type(error).__name__}: {error})") from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels and image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale directly: the full-size pixels never exist.
        scale = next((s for s in (2, 4, 8) if width * height <= max_pixels * s * s), 8)
        image.draft("RGB", (-(-width // scale), -(-height // scale)))
        width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise UnreadableImageError(
            f"header says {width}x{height} = {width * height} pixels, more than max_pixels={max_pixels}"
        )
    try:
        image.load()
        if image.mode == "P":  # palette transparency converts cleanly only via RGBA
            image = image.convert("RGBA")
        return image.convert("RGB")
    except Exception as error:
        raise UnreadableImageError(f"decoding failed ({type(error).__name__}: {error})") from error


def find_images(root: str | os.PathLike) -> list[Path]:
    """Every image under `root` (any case of `IMAGE_EXTENSIONS`), recursively, in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist or is not a directory; "
            f"pass the folder that holds the images (searched recursively)"
        )
    paths = sorted(
        path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )
    if not paths:
        raise ValueError(
            f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case); "
            f"point the source at a folder with images in it"
        )
    return paths


def input_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files as given, and the images directly inside given folders (sorted): the inputs of a
    `predict` verb, whose outputs are named by stem, so two inputs of one stem are refused."""
    found: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} is neither an image file nor a folder of images")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(map(str, paths))}")
    first: dict[str, Path] = {}
    for path in found:
        if first.setdefault(path.stem, path) != path:
            raise ValueError(
                f"{first[path.stem]} and {path} would write the same output {path.stem}.png; rename one, "
                "or predict them into separate --output folders"
            )
    return found


def shown(items: Sequence[Any], limit: int = 3) -> str:
    """The first `limit` items for a message, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(item) for item in items[:limit]) + more


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty lines of a text file, stripped; '#' starts a comment line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise ValueError(f"{what} file {path} is empty; write one entry per line")
    return lines


def clean_caption(text: str, where: str) -> str:
    """A caption stripped of surrounding whitespace, or `UnreadableTargetError` when nothing is left."""
    caption = text.strip()
    if not caption:
        raise UnreadableTargetError(f"empty caption ({where})")
    return caption


def is_indexable(source: Any) -> bool:
    """Whether a source is read by index (`len`, `load`), not streamed."""
    return hasattr(source, "__len__") and hasattr(source, "load")


def mix_seed(*values: int) -> int:
    """Hash integers into a 63-bit seed (splitmix64 rounds), cheap enough to call per sample."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        state = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        state = ((state ^ (state >> 27)) * 0x94D049BB133111EB) & _MASK64
        state ^= state >> 31
    return state >> 1


@dataclasses.dataclass(frozen=True)
class PendingSample:
    """A raw sample chosen for a batch but not decoded yet."""

    key: str
    index: int  # index in its source, -1 for webdataset samples
    source_id: int  # which child of a MixtureSource, else 0
    transform_seed: int  # set by the stream from the sample's place in the epoch
    load: Callable[[], Any]
    load_target: Callable[[], int | str] | None  # None when the stream carries no targets


class LocalImageFiles:
    """Shared access for sources that hold a list of local image `paths` (and int `targets` if labelled)."""

    paths: list[Path]
    targets: list[int] | None
    location: Path  # what the source was built from, for messages

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        return decode_rgb(self.paths[index], max_pixels)

    def target(self, index: int) -> int:
        if self.targets is None:
            raise ValueError(f"{self!r} has no labels; build it with with_labels=True")
        return self.targets[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location})"


class ConcatSource:
    """Indexable sources end to end, in order (a split listed as several sources, docs/data.md); every
    part names the same `classes`, or none does."""

    def __init__(self, sources: Sequence[Any]):
        streaming = [source for source in sources if not is_indexable(source)]
        if streaming:
            raise ValueError(
                f"{streaming[0]!r} streams its samples and cannot be concatenated with other sources; "
                "list all its shards in one wds source (a brace pattern or a folder)"
            )
        class_lists = [getattr(source, "classes", None) for source in sources]
        differ = next((i for i, names in enumerate(class_lists) if names != class_lists[0]), None)
        if differ is not None:
            first, other = (shown(class_lists[i] or ["no class names"]) for i in (0, differ))
            raise ValueError(
                f"sources 1 and {differ + 1} label different classes ({first} vs {other}); their labels "
                "would mean different classes: give every source the same class folders"
            )
        self.sources = list(sources)
        self.ends = list(itertools.accumulate(len(source) for source in self.sources))
        self.classes = class_lists[0]
        self.target_type = getattr(self.sources[0], "target_type", None)
        parts = [[getattr(source, name, None) for source in self.sources] for name in ("paths", "targets")]
        self.paths, self.targets = (
            [x for part in lists for x in part] if all(lists) else None for lists in parts
        )

    def __len__(self) -> int:
        return self.ends[-1]

    def _call(self, method: str, index: int, *args: Any) -> Any:
        part = bisect.bisect_right(self.ends, index)
        return getattr(self.sources[part], method)(index - (self.ends[part - 1] if part else 0), *args)

    def key(self, index: int) -> str:
        return self._call("key", index)

    def load(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        return self._call("load", index, max_pixels)

    def target(self, index: int) -> int | str:
        return self._call("target", index)


class SourceSubset:
    """Samples `indices` of an indexable source, in that order; `targets`, when given, replace the
    source's labels (e.g. a zero-shot set's logit columns)."""

    def __init__(self, source: Any, indices: Sequence[int], targets: Sequence[int] | None = None):
        self.source, self.indices, self.targets = source, indices, targets
        self.target_type = int if targets is not None else getattr(source, "target_type", int)
        self.classes = getattr(source, "classes", None)

    def __len__(self) -> int:
        return len(self.indices)

    def key(self, index: int) -> str:
        return self.source.key(self.indices[index])

    def load(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        return self.source.load(self.indices[index], max_pixels)

    def target(self, index: int) -> int | str:
        return self.targets[index] if self.targets is not None else self.source.target(self.indices[index])


def stream_target_type(source: Any) -> type | None:
    """int (labels), str (captions) or None: what targets `source` gives the stream."""
    gives = hasattr(source, "target") or not is_indexable(source)  # a streaming source parses its own
    return getattr(source, "target_type", None) if gives else None


class MixtureSource:
    """A weighted mixture of sources, `samples_per_epoch` images per epoch over all ranks; it streams:
    each worker draws every sample's child with an RNG seeded by (seed, epoch, rank, worker)."""

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], samples_per_epoch: int):
        if len(sources) == 0 or len(sources) != len(weights):
            raise ValueError(
                f"MixtureSource needs one weight per source, "
                f"got {len(sources)} sources and {len(weights)} weights"
            )
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be non-negative with a positive sum, got {list(weights)}")
        if any(isinstance(source, MixtureSource) for source in sources):
            raise ValueError("nested MixtureSource is not supported; list all sources in one mixture")
        if samples_per_epoch <= 0:
            raise ValueError(f"samples_per_epoch must be positive, got {samples_per_epoch}")
        total = float(sum(weights))
        self.sources = list(sources)
        self.weights = [float(w) / total for w in weights]
        self.samples_per_epoch = samples_per_epoch

    @property
    def num_samples(self) -> int:
        return self.samples_per_epoch

    @property
    def target_type(self) -> type | None:
        """The children's common target type; None (with a warning) when some give none."""
        kinds = [stream_target_type(child) for child in self.sources]
        if None in kinds:
            if any(kinds):
                logger.warning("some mixture children give no targets, so batches carry images only")
            return None
        if len(set(kinds)) > 1:
            raise ValueError(
                "mixture children give both labels and captions; mix sources of one target kind "
                "(or turn targets off)"
            )
        class_lists = {tuple(child.classes) for child in self.sources if getattr(child, "classes", None)}
        if len(class_lists) > 1:  # the same index would mean different classes in different children
            raise ValueError(
                "mixture children have different class lists, so their label indices disagree; "
                "mix only sources labelled with the same classes"
            )
        return kinds[0]

    @property
    def classes(self) -> list[str] | None:
        """The children's class names when every child has them (`target_type` checks they agree)."""
        class_lists = [getattr(child, "classes", None) for child in self.sources]
        return class_lists[0] if all(class_lists) else None

    def samples(self, stream: Any, worker: int, num_workers: int, wrap: bool) -> Iterator[PendingSample]:
        """The worker's samples, each from the child its weighted draw picks (children always wrap)."""
        children = [
            _walk(child, stream, child_id, worker, num_workers)
            if is_indexable(child)
            else child.samples(stream, worker, num_workers, True)
            for child_id, child in enumerate(self.sources)
        ]
        rng = np.random.default_rng(mix_seed(TAG_MIXTURE, stream.seed, stream.epoch, stream.rank, worker))
        while True:  # fixed chunk size keeps the sequence independent of how much is consumed
            for choice in rng.choice(len(self.sources), size=4096, p=self.weights).tolist():
                sample = next(children[choice], None)
                if sample is None:
                    return
                yield dataclasses.replace(sample, key=f"{choice}:{sample.key}", source_id=choice)


def _walk(child: Any, stream: Any, child_id: int, worker: int, num_workers: int) -> Iterator[PendingSample]:
    """An indexable child's (seed, epoch)-permutation from the worker's slot, stride all slots, wrapping."""
    slot, slots = stream.rank * num_workers + worker, stream.world_size * num_workers
    generator = torch.Generator().manual_seed(mix_seed(TAG_CHILD, stream.seed, stream.epoch, child_id))
    order = torch.randperm(len(child), generator=generator)
    for step in itertools.count():
        index = int(order[(slot + step * slots) % len(order)])
        load = functools.partial(child.load, index, stream.max_pixels)
        load_target = functools.partial(child.target, index) if stream.target_type is not None else None
        yield PendingSample(child.key(index), index, 0, 0, load, load_target)


def read_utf8(path: Path, what: str) -> str:
    """The text of `path`; a byte that is not UTF-8 is a ValueError naming the file and the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path} line {line} is not valid UTF-8 (byte {data[error.start]:#04x}); save the {what} as UTF-8"
        ) from None


def read_class_names(path: str | Path) -> list[str]:
    """Class names, one per line, or a Kinetics labels CSV (`id,name` rows after a header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class list {path} does not exist; give one class name per line")
    lines = [line.strip() for line in read_utf8(path, "class list").splitlines() if line.strip()]
    if lines and "," in lines[0] and lines[0].lower().replace(" ", "") in ("id,name", "label,name"):
        return [line.split(",", 1)[1].strip() for line in lines[1:]]
    return lines
