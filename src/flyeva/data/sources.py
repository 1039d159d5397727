"""Image sources, with optional targets: class labels (fine-tuning) or captions (EVA-CLIP).

MIM pretraining ignores labels and captions (docs/recipes.md §3, "Data"); the transfer stages
(section 4) read them. Two kinds of source feed `flyeva.data.stream.ImageBatchStream`:

- indexable (`ImageFolderSource`, `ImageNetFolderSource`, `FileListSource`, `CifarSource`,
  `CaptionTableSource`, `CaptionFolderSource`, `SyntheticShapesSource`, `ConcatSource`, `SourceSubset`):
  `len(source)`, `source.key(i)` and `source.load(i, max_pixels)`; the stream shuffles indices itself.
- streaming (`WebDatasetSource`): a list of local tar shards read front to back; the stream splits
  shards across ranks and workers.

Targets. A source gives targets when its `target_type` is `int` (class labels) or `str`
(captions); an indexable one then reads sample i's target with `source.target(i)`, a webdataset
one parses a member of each sample (`target_key`). Targets are read lazily, like images.

`MixtureSource` draws from several of either kind with fixed weights, as EVA merges six datasets
into "merged-30M". Every decode goes through `decode_rgb`, which turns any failure into
`UnreadableImageError` with a one-line reason; a missing or unreadable target raises
`UnreadableTargetError`. The stream skips, counts and reports both.
"""

from __future__ import annotations

import bisect
import csv
import difflib
import io
import itertools
import logging
import math
import os
import pickle
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# webdataset member suffixes that hold the image, in order of preference.
WDS_IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
# webdataset target members: "cls" holds an integer class label, "txt" a caption (webdataset's conventions).
WDS_TARGET_TYPES: dict[str, type] = {"cls": int, "txt": str}
# Training images above this are decoded smaller (JPEG draft mode) or skipped and counted: 40 MP is
# far above any training set's images, while PIL's own bomb limit (179 MP) allows 1.3 GB per image.
DEFAULT_MAX_PIXELS = 40_000_000
# CIFAR's python version: meta file, class-name key, label key, train batches, test batches.
CIFAR = {
    "cifar10": (
        "batches.meta",
        "label_names",
        "labels",
        [f"data_batch_{i}" for i in "12345"],
        ["test_batch"],
    ),
    "cifar100": ("meta", "fine_label_names", "fine_labels", ["train"], ["test"]),
}

logger = logging.getLogger(__name__)


class UnreadableImageError(Exception):
    """An image that cannot be used: empty, not an image, truncated, or too large. str() = reason."""


class UnreadableTargetError(Exception):
    """A label or caption that is missing, empty or cannot be parsed. str() = reason."""


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


def _has_image_extension(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _find_images(root: Path) -> list[Path]:
    """Every image under `root`, recursively, in sorted path order; errors if there are none."""
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist or is not a directory; "
            f"pass the folder that holds the images (searched recursively)"
        )
    paths = sorted(path for path in root.rglob("*") if _has_image_extension(path) and path.is_file())
    if not paths:
        raise ValueError(
            f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, any case); "
            f"point the source at a folder with images in it"
        )
    return paths


def _shown(items: Sequence[Any], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(str(item) for item in items[:limit]) + more


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


class ImageFolderSource(LocalImageFiles):
    """Every image under `root`, recursively, in sorted path order.

    With `with_labels=True` it is the ImageNet/torchvision ImageFolder layout: the class of an
    image is its first-level sub-folder, `classes` are those folder names sorted, `class_to_idx`
    maps them to 0..C-1 and `target(i)` is image i's class index. Every class folder must hold an
    image and no image may sit directly under `root`, so label indices never shift silently;
    `allow_empty_classes` only warns, for evaluation sets whose classes are candidates to score.
    """

    def __init__(self, root: str | os.PathLike, with_labels: bool = False, allow_empty_classes: bool = False):
        self.root = self.location = Path(root)
        self.paths = _find_images(self.root)
        self.with_labels = with_labels
        self.target_type: type | None = int if with_labels else None
        self.classes: list[str] | None = None
        self.class_to_idx: dict[str, int] | None = None
        self.targets: list[int] | None = None
        if with_labels:
            self._read_classes(allow_empty_classes)

    def _read_classes(self, allow_empty: bool) -> None:
        top_level = [path for path in self.paths if path.parent == self.root]
        if top_level:
            raise ValueError(
                f"{len(top_level)} images lie directly under {self.root} (first: {_shown(top_level)}), "
                f"outside any class folder; with_labels=True needs root/<class>/<image>: "
                f"move them into class folders or use with_labels=False"
            )
        # Hidden folders (.ipynb_checkpoints, .cache) are tool debris, not classes.
        self.classes = sorted(
            entry.name for entry in self.root.iterdir() if entry.is_dir() and not entry.name.startswith(".")
        )
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        class_names = [path.relative_to(self.root).parts[0] for path in self.paths]
        self.paths = [path for path, name in zip(self.paths, class_names) if name in self.class_to_idx]
        self.targets = [self.class_to_idx[name] for name in class_names if name in self.class_to_idx]
        if not self.paths:
            raise ValueError(
                f"no class folders with images under {self.root}; with_labels=True needs "
                f"root/<class>/<image> (hidden folders are not classes)"
            )
        empty = sorted(set(self.classes) - set(class_names))
        if empty and allow_empty:  # still scored as candidates; none of their images counts
            logger.warning("%s: %d class folders hold no images: %s", self.root, len(empty), _shown(empty))
        elif empty:
            raise ValueError(
                f"{len(empty)} class folders under {self.root} hold no images: {_shown(empty, 10)}; "
                f"they would still take a class index, so remove them or add their images "
                f"(symlinked folders are not followed)"
            )


class FileListSource(LocalImageFiles):
    """Images named one per line in a text file, as `path` or `path<whitespace>label`.

    The label column is ignored unless `with_labels=True`; then every line needs one, a
    non-negative integer, and `target(i)` returns it. Relative paths resolve against `root`, or the
    list file's folder when `root` is None. Blank lines and lines starting with '#' are skipped.
    `check_files` stats every path up front (turn it off for lists of millions on a slow file
    system; missing files are then skipped at read time and counted like any unreadable image).
    """

    def __init__(
        self,
        list_file: str | os.PathLike,
        root: str | os.PathLike | None = None,
        check_files: bool = True,
        with_labels: bool = False,
    ):
        self.list_file = self.location = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(
                f"image list file {self.list_file} does not exist; "
                f"pass a text file with one image path per line"
            )
        base = Path(root) if root is not None else self.list_file.parent
        self.with_labels = with_labels
        self.target_type: type | None = int if with_labels else None
        self.paths = []
        self.targets: list[int] | None = [] if with_labels else None
        for line_number, line in enumerate(self.list_file.read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # A path with spaces needs a tab before the label column.
            columns = [column.strip() for column in line.split("\t")] if "\t" in line else line.split()
            path = Path(columns[0])
            self.paths.append(path if path.is_absolute() else base / path)
            if self.targets is not None:
                self.targets.append(self._parse_label(columns, line_number))
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

    def _parse_label(self, columns: list[str], line_number: int) -> int:
        where = f"{self.list_file} line {line_number}"
        if len(columns) < 2 or not columns[1]:
            raise ValueError(
                f"{where} has no label after the path {columns[0]!r}; with_labels=True needs "
                f"'path<whitespace>label' on every line (a path with spaces needs a tab before the label)"
            )
        try:
            label = int(columns[1])
        except ValueError:
            label = -1
        if label < 0:
            raise ValueError(
                f"{where} has label {columns[1]!r}, not a non-negative integer; "
                f"write class indices 0..C-1 in the second column"
            )
        return label


def is_clean_utf8(text: str) -> bool:
    """False when the text came from invalid UTF-8 bytes (decoded with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean_caption(text: str, where: str) -> str:
    caption = text.strip()
    if not caption:
        raise UnreadableTargetError(f"empty caption ({where})")
    return caption


class CaptionTableSource(LocalImageFiles):
    """Image-caption pairs from a CSV or TSV table with a header row, as open_clip's CsvDataset reads.

    `path_column` and `caption_column` default to open_clip's "filepath" and "title". `sep` is
    inferred from the extension when None (.tsv: tab, .csv: comma). Relative paths resolve against
    `root`, or the table's folder when `root` is None. Files are not checked up front (tables hold
    millions of rows): a missing image or an empty caption is skipped and counted at read time.
    """

    target_type = str

    def __init__(
        self,
        path: str | os.PathLike,
        root: str | os.PathLike | None = None,
        path_column: str = "filepath",
        caption_column: str = "title",
        sep: str | None = None,
    ):
        self.table = self.location = Path(path)
        if not self.table.is_file():
            raise FileNotFoundError(
                f"caption table {self.table} does not exist; pass a .csv or .tsv file with a header row"
            )
        if sep is None:
            separators = {".tsv": "\t", ".csv": ","}
            sep = separators.get(self.table.suffix.lower())
            if sep is None:
                raise ValueError(
                    f"cannot infer the separator of {self.table} from its extension "
                    f"{self.table.suffix!r}; name it .csv or .tsv, or pass sep="
                )
        base = Path(root) if root is not None else self.table.parent
        self.paths: list[Path] = []
        self.captions: list[str] = []
        self.bad_lines: dict[int, int] = {}  # row index -> line of the table that is not valid UTF-8
        # surrogateescape: one row with invalid UTF-8 is skipped and counted at read time, not fatal.
        with open(self.table, newline="", encoding="utf-8", errors="surrogateescape") as file:
            reader = csv.reader(file, delimiter=sep)
            header = [name.strip() for name in next(reader, [])]
            missing = [name for name in (path_column, caption_column) if name not in header]
            if missing:
                raise ValueError(
                    f"caption table {self.table} has no column(s) {missing}; its columns are {header} "
                    f"(read with sep={sep!r}); pass path_column=/caption_column= or the right sep"
                )
            path_at, caption_at = header.index(path_column), header.index(caption_column)
            for row in reader:
                if not any(field.strip() for field in row):
                    continue
                if len(row) <= max(path_at, caption_at) or not row[path_at].strip():
                    raise ValueError(
                        f"caption table {self.table} line {reader.line_num} has no {path_column!r} value "
                        f"or too few columns ({len(row)} of {len(header)}); fix or remove that row"
                    )
                if not is_clean_utf8(row[path_at]) or not is_clean_utf8(row[caption_at]):
                    self.bad_lines[len(self.paths)] = reader.line_num
                image_path = Path(row[path_at].strip())
                self.paths.append(image_path if image_path.is_absolute() else base / image_path)
                self.captions.append(row[caption_at])
        if not self.paths:
            raise ValueError(f"caption table {self.table} has no rows; add an image path and caption per row")

    def target(self, index: int) -> str:
        if index in self.bad_lines:
            raise UnreadableTargetError(f"{self.table} line {self.bad_lines[index]} is not valid UTF-8")
        return _clean_caption(self.captions[index], f"row {index + 1} of {self.table.name}")


class CaptionFolderSource(LocalImageFiles):
    """Images under `root` (recursively), each captioned by a sidecar file: a.jpg with a.txt.

    Captions are read lazily; an image without its sidecar, or with an empty one, is a bad pair
    that the stream skips and counts at read time.
    """

    target_type = str

    def __init__(self, root: str | os.PathLike):
        self.root = self.location = Path(root)
        self.paths = _find_images(self.root)

    def target(self, index: int) -> str:
        sidecar = self.paths[index].with_suffix(".txt")
        try:
            text = sidecar.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise UnreadableTargetError(f"no caption file {sidecar.name} next to the image") from error
        except UnicodeDecodeError as error:
            raise UnreadableTargetError(f"{sidecar} is not valid UTF-8") from error
        except OSError as error:
            raise UnreadableTargetError(f"caption file {sidecar.name} unreadable ({error})") from error
        return _clean_caption(text, f"caption file {sidecar.name}")


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


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K wnids in class-index order (the list timm ships)."""
    import timm

    return read_lines(Path(timm.__file__).parent / "data" / "_info" / "imagenet_synsets.txt", "wnid")


def imagenet_index(entry: str, wnid_to_index: dict[str, int], where: str) -> int:
    """An ImageNet class index from a wnid ('n01440764') or an index ('0'..'999')."""
    if entry.isdigit() and int(entry) < len(wnid_to_index):
        return int(entry)
    if entry in wnid_to_index:
        return wnid_to_index[entry]
    raise ValueError(
        f"{where}: {entry!r} is neither an ImageNet-1K wnid nor a class index 0..{len(wnid_to_index) - 1}; "
        "map such folders with a class_map file (folder<TAB>wnid)"
    )


class ImageNetFolderSource(ImageFolderSource):
    """Class folders labelled with ImageNet-1K class indices: IN-1K and its variants (-V2, -A, -R, -Sketch).

    A folder is named by wnid, by class index (ImageNet-V2's release) or mapped by a `class_map`
    file ("folder<TAB>wnid or index" lines). `classes` are the 1000 wnids in timm's order and
    `target(i)` is an index into them; `subset` lists the classes the set covers: its folders', or
    a `subset_file`'s (wnids or indices, e.g. ImageNet-R's 200), which must include every folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        subset_file: str = "",
        class_map_file: str = "",
        allow_empty: bool = False,
    ):
        super().__init__(root, with_labels=True, allow_empty_classes=allow_empty)
        wnids = imagenet_wnids()
        wnid_to_index = {wnid: index for index, wnid in enumerate(wnids)}
        class_map = {}
        for line in read_lines(class_map_file, "class map") if class_map_file else []:
            folder, _, entry = line.replace("\t", " ").rpartition(" ")
            class_map[folder.strip()] = imagenet_index(entry, wnid_to_index, class_map_file)
        folders = self.classes or []
        index_of = [
            class_map[name] if name in class_map else imagenet_index(name, wnid_to_index, str(root))
            for name in folders
        ]
        entries = read_lines(subset_file, "subset") if subset_file else []
        listed = {imagenet_index(entry.split()[0], wnid_to_index, subset_file) for entry in entries}
        self.subset = sorted(listed or set(index_of))
        covered = set(self.subset)
        outside = [name for name, index in zip(folders, index_of) if index not in covered]
        if outside:
            raise ValueError(
                f"{root}: class folders {_shown(outside)} are not in the subset {subset_file}; "
                "add them to the subset file or remove the folders"
            )
        if not subset_file and len(covered) < len(wnids):  # ImageNet-A/R hold 200 classes on purpose
            missing = _shown([wnid for index, wnid in enumerate(wnids) if index not in covered], 5)
            logger.warning(
                f"{root} holds {len(covered)} of ImageNet's 1000 classes (missing e.g. {missing}): zero-shot "
                "scores only those; restore folders missing by mistake, or pass a subset file"
            )
        self.targets = [index_of[label] for label in self.targets or []]
        self.classes, self.class_to_idx = wnids, wnid_to_index


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, and refuses every other global.

    A pickle names the functions it calls; CIFAR's need only numpy's array reconstruction, so
    anything else (os.system, builtins.eval, ...) is refused instead of executed.
    """

    def __init__(self, file: Any, source: str):
        super().__init__(file, encoding="latin1")  # CIFAR's pickles were written by Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy.(_)core.multiarray._reconstruct
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self.source} asks to load {module}.{name}, which a CIFAR pickle never needs; refusing it "
            "(unpickling it could run code). Re-download CIFAR's python version from its original site"
        )


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """One CIFAR python-version pickle (a dict), read without executing code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist; pass the extracted cifar-*-python folder")
    try:
        with open(path, "rb") as file:
            data = _NumpyOnlyUnpickler(file, str(path)).load()
    except pickle.UnpicklingError as error:  # the refusal above, or a file that is not a pickle at all
        raise ValueError(str(error).splitlines()[0]) from None
    except (EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is truncated or not a CIFAR pickle ({error}); re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a CIFAR batch dict")
    return data


class CifarSource:
    """CIFAR-10/100's python version (data_batch_*, test_batch, batches.meta / train, test, meta).

    `kind` is "cifar10" or "cifar100" (fine labels); `classes` are the meta file's label names.
    The 32x32 images are held in memory as one uint8 array.
    """

    target_type = int

    def __init__(self, root: str | os.PathLike, kind: str, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"a {kind} source needs split: train or test, got {split!r}")
        self.root, self.kind, self.split = Path(root), kind, split
        meta, names_key, label_key, train_files, test_files = CIFAR[kind]
        self.classes = [str(name) for name in read_cifar_pickle(self.root / meta)[names_key]]
        files = train_files if split == "train" else test_files
        batches = [read_cifar_pickle(self.root / file) for file in files]
        self.targets = [int(label) for batch in batches for label in batch[label_key]]
        # Each row is 1024 red, 1024 green, 1024 blue values, each row-major over 32 x 32.
        rows = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
        self.pixels = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def key(self, index: int) -> str:
        return f"{self.kind}-{self.split}-{index:05d}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        return Image.fromarray(self.pixels[index])

    def target(self, index: int) -> int:
        return self.targets[index]


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
    `target_key` "cls" gives each sample the integer in its .cls member, "txt" the caption in its
    .txt member (utf-8, stripped); a sample without it is skipped and counted by the stream.
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

    def iter_shard(self, shard: str) -> Iterator[tuple[str, bytes | None, bytes | None]]:
        """Yield (key, image bytes, target member bytes) for one shard; None for a missing member.

        The target is always None when `target_key` is None.
        """
        current_key: str | None = None
        members: dict[str, bytes] = {}
        with open(shard, "rb") as stream:
            for member in tar_file_iterator(stream):
                key, suffix = base_plus_ext(member["fname"])
                if key is None:
                    continue
                if key != current_key:
                    if current_key is not None:
                        yield current_key, _pick_image(members), self._pick_target(members)
                    current_key, members = key, {}
                members[suffix.lower()] = member["data"]
        if current_key is not None:
            yield current_key, _pick_image(members), self._pick_target(members)

    def _pick_target(self, members: dict[str, bytes]) -> bytes | None:
        return members.get(self.target_key) if self.target_key is not None else None

    def parse_target(self, key: str, data: bytes | None) -> int | str:
        """The label or caption of sample `key` from its target member, or `UnreadableTargetError`."""
        if data is None:
            raise UnreadableTargetError(f"webdataset sample {key} has no .{self.target_key} member")
        try:
            text = data.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise UnreadableTargetError(f".{self.target_key} member is not utf-8 ({error})") from error
        if self.target_type is str:
            return _clean_caption(text, f".txt member of {key}")
        try:
            label = int(text)
        except ValueError:
            label = -1
        if label < 0:
            raise UnreadableTargetError(f".cls member holds {text[:40]!r}, not a non-negative integer")
        return label


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


def is_indexable(source: Any) -> bool:
    """Whether a source is read by index (`len`, `load`), not streamed."""
    return hasattr(source, "__len__") and hasattr(source, "load")


class ConcatSource:
    """Indexable sources end to end, in order (a split listed as several sources, docs/data.md).

    Every part names the same `classes`, or none does; `paths` and `targets` join the parts'.
    """

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
            first, other = (_shown(class_lists[i] or ["no class names"]) for i in (0, differ))
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
    """Samples `indices` of an indexable source, in that order: one rank's share, or an evaluation's pick.

    `targets`, when given, replace the source's labels (e.g. a zero-shot set's logit columns).
    """

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


@dataclass
class SourceConfig:
    """One data source, as every stage's config lists them (`data.sources: [...]`, docs/data.md).

    What a sample's target is (nothing, a class label or a caption) is decided by the stage that
    reads the source, not by the config: pretraining reads images only, classification labels,
    CLIP captions. A caption is one file's whole text (caption folders: `image.txt` beside
    `image.jpg`) or one table cell (caption tables); never one line of a longer file.
    """

    type: str = "folder"  # one of SOURCE_KEYS: folder | imagenet | list | cifar10 | wds | captions | ...
    path: str = ""  # folder, list file, webdataset shard pattern, or caption table
    weight: float = 1.0  # relative sampling weight inside a mixture
    num_samples: int = 0  # wds: samples per epoch (optional); synthetic / shapeworld: the data set size
    seed: int = 0  # synthetic / shapeworld
    image_size: int = 0  # synthetic / shapeworld (0 = 64)
    root: str = ""  # list / captions: the folder relative paths start from
    target: str = ""  # wds: the member holding the target ("" = cls for labels, txt for captions)
    check_files: bool = True  # list: check every listed file exists up front
    path_column: str = ""  # captions ("" = open_clip's "filepath")
    caption_column: str = ""  # captions ("" = open_clip's "title")
    sep: str = ""  # captions ("" = from the extension: .tsv tab, .csv comma)
    subset: str = ""  # imagenet: a file of wnids/indices the set covers ("" = its folders)
    class_map: str = ""  # imagenet: "folder<TAB>wnid|index" lines for folders not named by wnid/index
    split: str = ""  # cifar10 / cifar100: train | test


# The keys each source type reads (besides type and weight); another non-default key is an error.
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "folder": ("path",),
    "imagenet": ("path", "subset", "class_map"),
    "list": ("path", "root", "check_files"),
    "cifar10": ("path", "split"),
    "cifar100": ("path", "split"),
    "wds": ("path", "num_samples", "target"),
    "captions": ("path", "root", "path_column", "caption_column", "sep"),
    "caption_folder": ("path",),
    "synthetic": ("num_samples", "image_size", "seed"),
    "shapeworld": ("num_samples", "image_size", "seed"),
}
REQUIRED_KEYS = {"synthetic": "num_samples", "shapeworld": "num_samples"}  # every other type: path
TARGETS = ("label", "caption")  # what a stage may ask a source for (None: images only)
_TARGET_TYPES = {
    "label": ("folder", "imagenet", "list", "cifar10", "cifar100", "wds", "shapeworld"),
    "caption": ("wds", "captions", "caption_folder", "shapeworld"),
}


def source_config(spec: SourceConfig | dict[str, Any]) -> SourceConfig:
    """A `SourceConfig` from itself or a plain dict (Python callers), unknown keys named with a hint."""
    if isinstance(spec, SourceConfig):
        return spec
    known = [f.name for f in fields(SourceConfig)]
    for name in spec:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {known}"
            raise ValueError(f"unknown data source key {name!r}; {hint}")
    return SourceConfig(**spec)


def check_source(config: SourceConfig, target: str | None = None) -> None:
    """Reject a source the stage cannot read, and keys its type would ignore, before any work."""
    if config.type not in SOURCE_KEYS:
        raise ValueError(f"unknown data source type {config.type!r}; use one of {sorted(SOURCE_KEYS)}")
    if target is not None and config.type not in _TARGET_TYPES[target]:
        raise ValueError(
            f"a {config.type!r} source has no {target}s; this stage reads {list(_TARGET_TYPES[target])}"
        )
    defaults = type(config)()  # a stage's own section (zero-shot sets) may default differently
    reads = SOURCE_KEYS[config.type]
    for key in (f.name for f in fields(SourceConfig)):
        if key not in (*reads, "type", "weight") and getattr(config, key) != getattr(defaults, key):
            raise ValueError(
                f"data source key {key!r} does not apply to a {config.type!r} source (it reads {reads})"
            )
    required = REQUIRED_KEYS.get(config.type, "path")
    if not getattr(config, required):
        raise ValueError(f"a {config.type!r} data source needs {required!r}; add it to its config")


def build_source(
    spec: SourceConfig | dict[str, Any], target: str | None = None, allow_empty_classes: bool = False
) -> Any:
    """The source a `SourceConfig` describes, whose samples carry `target` (None, "label", "caption").

    `allow_empty_classes`: an empty class folder only warns (evaluation sets score every class).
    """
    config = source_config(spec)
    check_source(config, target)
    kind, labels = config.type, target == "label"
    if kind == "folder":
        return ImageFolderSource(config.path, with_labels=labels, allow_empty_classes=allow_empty_classes)
    if kind == "imagenet":
        return ImageNetFolderSource(config.path, config.subset, config.class_map, allow_empty_classes)
    if kind in CIFAR:
        return CifarSource(config.path, kind, config.split)
    if kind == "list":
        return FileListSource(
            config.path, root=config.root or None, check_files=config.check_files, with_labels=labels
        )
    if kind == "wds":
        member = config.target or {"label": "cls", "caption": "txt"}.get(target or "")
        return WebDatasetSource(config.path, num_samples=config.num_samples or None, target_key=member)
    if kind == "captions":
        return CaptionTableSource(
            config.path,
            root=config.root or None,
            path_column=config.path_column or "filepath",
            caption_column=config.caption_column or "title",
            sep=config.sep or None,
        )
    if kind == "caption_folder":
        return CaptionFolderSource(config.path)
    if kind == "synthetic":
        return SyntheticShapesSource(config.num_samples, config.image_size or 64, config.seed)
    from flyeva.data.synthetic import (  # the miniature world, generated on the fly
        ShapeWorld,
        ShapeWorldSource,
    )

    world = ShapeWorld(image_size=config.image_size or 64, seed=config.seed)
    return ShapeWorldSource(world, config.num_samples, target=target)


def build_sources(
    specs: list[SourceConfig] | list[dict[str, Any]], samples_per_epoch: int = 0, target: str | None = None
) -> Any:
    """One source, or a weighted mixture of several (which needs `samples_per_epoch`)."""
    configs = [source_config(spec) for spec in specs]
    if not configs:
        raise ValueError("no data sources: list at least one under data.sources")
    if len(configs) == 1:
        return build_source(configs[0], target)
    if samples_per_epoch <= 0:
        raise ValueError("a mixture of data sources needs data.samples_per_epoch")
    return MixtureSource(
        [build_source(config, target) for config in configs], [c.weight for c in configs], samples_per_epoch
    )
