"""Image sources for MIM pretraining (EVA_SPEC section 3, "Data"): labels and captions are ignored.

Two kinds of source feed `flyeva.data.stream.ImageBatchStream`:

- indexable (`ImageFolderSource`, `FileListSource`, `SyntheticShapesSource`): `len(source)`,
  `source.key(i)` and `source.load(i, max_pixels)`; the stream shuffles indices itself.
- streaming (`WebDatasetSource`): a list of local tar shards read front to back; the stream splits
  shards across ranks and workers.

`MixtureSource` draws from several of either kind with fixed weights, as EVA merges six datasets
into "merged-30M". Every decode goes through `decode_rgb`, which turns any failure into
`UnreadableImageError` with a one-line reason so that the stream can skip, count and report it.
"""

from __future__ import annotations

import difflib
import io
import math
import os
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# webdataset member suffixes that hold the image, in order of preference; txt/cls/json are ignored.
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# PIL raises DecompressionBombError above 2 * Image.MAX_IMAGE_PIXELS (89,478,485); use the same bound.
DEFAULT_MAX_PIXELS = 178_956_970


class UnreadableImageError(Exception):
    """An image that cannot be used: empty, not an image, truncated, or too large. str() = reason."""


def decode_rgb(data: bytes | str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode a file path or encoded bytes into an RGB PIL image, or raise `UnreadableImageError`.

    The pixel count is checked from the header, before any pixel is decoded.
    """
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


def _has_image_extension(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


class ImageFolderSource:
    """Every image under `root`, recursively, in sorted path order; sub-folder names are not labels."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist or is not a directory; "
                f"pass the folder that holds the images (searched recursively)"
            )
        self.paths = sorted(
            path for path in self.root.rglob("*") if _has_image_extension(path) and path.is_file()
        )
        if not self.paths:
            raise ValueError(
                f"no images found under {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case); "
                f"point the source at a folder with images in it"
            )

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        return decode_rgb(self.paths[index], max_pixels)


class FileListSource:
    """Images named one per line in a text file, as `path` or `path<whitespace>label` (label ignored).

    Relative paths resolve against `root`, or the list file's folder when `root` is None. Blank
    lines and lines starting with '#' are skipped. `check_files` stats every path up front (turn
    it off for lists of millions on a slow file system; missing files are then skipped at read
    time and counted like any unreadable image).
    """

    def __init__(
        self, list_file: str | os.PathLike, root: str | os.PathLike | None = None, check_files: bool = True
    ):
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(
                f"image list file {self.list_file} does not exist; "
                f"pass a text file with one image path per line"
            )
        base = Path(root) if root is not None else self.list_file.parent
        self.paths = []
        for line in self.list_file.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # An optional second column (a label) is ignored; a path with spaces needs a tab before it.
            path = Path(line.split("\t")[0].strip() if "\t" in line else line.split()[0])
            self.paths.append(path if path.is_absolute() else base / path)
        if not self.paths:
            raise ValueError(f"image list file {self.list_file} names no images; add one image path per line")
        if check_files:
            missing = [path for path in self.paths if not path.is_file()]
            if missing:
                shown = ", ".join(str(path) for path in missing[:3])
                raise FileNotFoundError(
                    f"{len(missing)} of {len(self.paths)} paths in {self.list_file} do not exist "
                    f"(first: {shown}); relative paths resolve against {base}: "
                    f"pass root= the folder they are relative to"
                )

    def __len__(self) -> int:
        return len(self.paths)

    def key(self, index: int) -> str:
        return str(self.paths[index])

    def load(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        return decode_rgb(self.paths[index], max_pixels)


class SyntheticShapesSource:
    """Deterministic images of a few coloured rectangles and ellipses on a plain background.

    Image `index` depends only on (seed, index), never on call order: a stand-in dataset for tests
    and smoke runs that needs no files.
    """

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        if num_samples <= 0 or image_size <= 0:
            raise ValueError(
                f"SyntheticShapesSource needs num_samples > 0 and image_size > 0, "
                f"got {num_samples} and {image_size}"
            )
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def key(self, index: int) -> str:
        return f"synthetic-{index:08d}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_samples})")
        rng = random.Random(self.seed * 1_000_003 + index)
        size = self.image_size

        def colour() -> tuple[int, int, int]:
            return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

        image = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, x1 = sorted(rng.randrange(size) for _ in range(2))
            y0, y1 = sorted(rng.randrange(size) for _ in range(2))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, x1, y1), fill=colour())
        return image


def _expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(urls, str | os.PathLike):
        text = os.fspath(urls)
        if os.path.isdir(text):  # a folder of shards
            return sorted(str(path) for path in Path(text).glob("*.tar"))
        return expand_urls(text)
    return [os.fspath(url) for url in urls]


class WebDatasetSource:
    """Local webdataset tar shards; each sample's first jpg/jpeg/png/webp member is its image.

    `urls` is a list of paths, one path, a folder of `*.tar`, or a brace pattern such as
    `shards/train-{000000..000127}.tar`. `num_samples`, when given, fixes the epoch length (see
    `ImageBatchStream` for how it is split); without it each shard is read once per epoch.
    """

    def __init__(self, urls: str | os.PathLike | Sequence[str | os.PathLike], num_samples: int | None = None):
        self.pattern = urls if isinstance(urls, str | os.PathLike) else None
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

    def iter_shard(self, shard: str) -> Iterator[tuple[str, bytes | None]]:
        """Yield (key, image bytes or None when the sample has no image member) for one shard."""
        current_key: str | None = None
        members: dict[str, bytes] = {}
        with open(shard, "rb") as stream:
            for member in tar_file_iterator(stream):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, _pick_image(members)
                    current_key, members = key, {}
                members[suffix.lower()] = member["data"]
        if current_key is not None:
            yield current_key, _pick_image(members)


def _pick_image(members: dict[str, bytes]) -> bytes | None:
    for suffix in WDS_IMAGE_SUFFIXES:
        if suffix in members:
            return members[suffix]
    return None


# A shard that ends early (a truncated upload) must not stop training: the stream catches these.
SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError)


class MixtureSource:
    """A weighted mixture of sources; `samples_per_epoch` images in all ranks together per epoch.

    Weights are normalised to sum to 1. Which source each sample comes from is drawn by the
    stream with an RNG seeded by (seed, epoch, rank, worker), so a mixture is deterministic.
    """

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


REQUIRED_KEYS = {
    "folder": {"path"},
    "list": {"path"},
    "wds": {"path"},
    "synthetic": {"num_samples"},
    "mixture": {"sources", "samples_per_epoch"},
}
SOURCE_KEYS = {
    "folder": {"path"},
    "list": {"path", "root", "check_files"},
    "wds": {"path", "num_samples"},
    "synthetic": {"num_samples", "image_size", "seed"},
    "mixture": {"sources", "samples_per_epoch"},
}


def build_source(spec: dict[str, Any]) -> Any:
    """Build a source from a config dict, e.g. {"type": "folder", "path": "/data/in21k"}.

    A mixture is {"type": "mixture", "samples_per_epoch": N, "sources": [{..., "weight": w}, ...]};
    each child's "weight" defaults to 1.
    """
    spec = dict(spec)
    spec.pop("weight", None)  # a child's mixture weight is read by its parent
    kind = spec.pop("type", None)
    if kind not in SOURCE_KEYS:
        raise ValueError(f"unknown source type {kind!r}; use one of {sorted(SOURCE_KEYS)}")
    for name in spec:
        if name not in SOURCE_KEYS[kind]:
            close = difflib.get_close_matches(name, SOURCE_KEYS[kind], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {sorted(SOURCE_KEYS[kind])}"
            raise ValueError(f"unknown key {name!r} for a {kind!r} source; {hint}")
    missing = sorted(REQUIRED_KEYS[kind] - spec.keys())
    if missing:
        raise ValueError(f"a {kind!r} source needs the key(s) {missing}; add them to its config")
    if kind == "folder":
        return ImageFolderSource(spec["path"])
    if kind == "list":
        return FileListSource(spec["path"], root=spec.get("root"), check_files=spec.get("check_files", True))
    if kind == "wds":
        return WebDatasetSource(spec["path"], num_samples=spec.get("num_samples"))
    if kind == "synthetic":
        return SyntheticShapesSource(spec["num_samples"], spec.get("image_size", 64), spec.get("seed", 0))
    children = spec["sources"]
    return MixtureSource(
        [build_source(child) for child in children],
        [float(child.get("weight", 1.0)) for child in children],
        spec["samples_per_epoch"],
    )
