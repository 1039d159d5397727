"""Segmentation data: image + label-PNG pairs in the ADE20K, COCO-Stuff or a generic folder layout,
and ShapeWorld's semantic export for the miniature.

Layouts (`data.format`):
- ade20k:    ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{training,validation}/*.png;
             150 classes, reduce_zero_label (annotation 0 -> ignore 255, v -> v - 1), mmseg's
             `ADE20KDataset`.
- cocostuff: ROOT/images/{train2017,val2017}/*.jpg, ROOT/annotations/{train2017,val2017}/
             *_labelTrainIds.png (0..170, 255 ignore; mmseg's conversion), or with raw_ids=true the raw
             stuffthingmaps *.png (category id - 1), mapped to 0..170 here; 171 classes, 80 things then
             91 stuff, mmseg's `COCOStuffDataset`.
- folder:    TRAIN and VAL folders, each with images/ and labels/ (same file stem, label .png);
             class names from `classes` or ROOT/classes.txt.
- shapeworld: generated into OUTPUT/data when no root is given (`flyeva shapeworld export` layout).

A label value outside the class list (and not 255) is mapped to 255 and reported once per file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import numpy as np
from PIL import Image

from flyeva.data.sources import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, UnreadableTargetError, decode_rgb
from flyeva.data.sources.base import read_class_names

logger = logging.getLogger(__name__)
IGNORE_INDEX = 255
FORMATS = ("ade20k", "cocostuff", "folder", "shapeworld")
SHAPEWORLD_CLASSES = ["background", "circle", "square", "triangle", "star", "cross"]


def _names(file: str) -> list[str]:
    """Class names (package data, one per line), index = training label."""
    return (files(__package__) / "class_names" / file).read_text(encoding="utf-8").splitlines()


ADE20K_CLASSES = _names("ade20k.txt")
COCO_STUFF_CLASSES = _names("coco_stuff.txt")
# Raw COCO-Stuff PNGs (stuffthingmaps) store category id - 1; these 11 ids are unused in 2017, so the
# other 171 values map in order to 0..170 (mmseg's tools/convert_datasets/coco_stuff164k.py).
COCO_STUFF_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)


@dataclass
class DataSection:
    """Where the pairs are and how they read; see the module docstring for the layouts."""

    format: str = "ade20k"  # ade20k | cocostuff | folder | shapeworld
    root: str = ""
    train: str = ""  # folder: the training folder (images/ + labels/); default ROOT/train
    val: str = ""  # folder: the validation folder; default ROOT/val
    classes: list[str] = field(default_factory=list)  # folder: names, index = label value
    reduce_zero_label: bool = False  # folder: 0 = ignore, v -> v - 1 (ade20k: always on)
    raw_ids: bool = False  # cocostuff: raw stuffthingmaps PNGs instead of _labelTrainIds
    shapeworld_train: int = 2048  # shapeworld: generated training images
    shapeworld_val: int = 256
    shapeworld_size: int = 64
    shapeworld_seed: int = 0
    shapeworld_objects: list[int] = field(default_factory=lambda: [1, 4])  # min, max shapes per scene


def label_lookup(num_classes: int, reduce_zero_label: bool, raw_cocostuff: bool = False) -> np.ndarray:
    """A 256-entry table from stored label value to training label (255 = ignore)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if raw_cocostuff:
        used = [v for v in range(182) if v not in COCO_STUFF_UNUSED_RAW]
        table[used] = np.arange(len(used))
    elif reduce_zero_label:  # mmseg: 0 -> 255, then v - 1 (so 255 stays 255)
        table[1 : num_classes + 1] = np.arange(num_classes)
    else:
        table[:num_classes] = np.arange(num_classes)
    return table


class SegmentationPairs:
    """Indexable (image, label map) pairs; `load_pair(i)` raises Unreadable{Image,Target}Error."""

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        classes: list[str],
        lookup: np.ndarray,
        zero_is_ignore: bool = False,
    ) -> None:
        self.pairs, self.classes, self.lookup = pairs, list(classes), lookup
        # Stored values that are a class or a deliberate ignore; any other value is reported.
        self.stored_valid = lookup != IGNORE_INDEX
        self.stored_valid[IGNORE_INDEX] = True
        self.stored_valid[0] |= zero_is_ignore
        self.reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, index: int) -> str:
        return str(self.pairs[index][0])

    def load_label(self, index: int, size: tuple[int, int]) -> np.ndarray:
        path = self.pairs[index][1]
        if not path.is_file():
            raise UnreadableTargetError(f"no label file {path}")
        try:
            with Image.open(path) as handle:
                if handle.mode not in ("L", "P", "I", "I;16"):
                    raise UnreadableTargetError(
                        f"{path} is a {handle.mode} image; labels are 1-channel index PNGs"
                    )
                if handle.size[0] * handle.size[1] > DEFAULT_MAX_PIXELS:  # from the header, before decoding
                    raise UnreadableTargetError(f"{path} claims {handle.size[0]}x{handle.size[1]} pixels")
                stored = np.array(handle)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise UnreadableTargetError(f"{path} is not a readable PNG ({error})") from error
        if stored.shape != (size[1], size[0]):
            raise UnreadableTargetError(
                f"{path} is {stored.shape[1]}x{stored.shape[0]} but its image is {size[0]}x{size[1]}"
            )
        if stored.dtype != np.uint8:
            if stored.max() > IGNORE_INDEX or stored.min() < 0:  # a 16-bit label: never clip a class away
                raise UnreadableTargetError(
                    f"{path} holds label values up to {stored.max()}; labels are class indices 0-254 "
                    "(255 = ignore): convert the file"
                )
            stored = stored.astype(np.uint8)
        bad = ~self.stored_valid[stored]
        if bad.any() and str(path) not in self.reported:
            self.reported.add(str(path))
            values = np.unique(stored[bad]).tolist()
            logger.warning(
                "%s: label values %s are outside the %d classes; read as ignore",
                path,
                values[:10],
                len(self.classes),
            )
        return self.lookup[stored]

    def load_pair(self, index: int, max_pixels: int | None = None) -> tuple[Image.Image, np.ndarray]:
        image = decode_rgb(self.pairs[index][0])
        return image, self.load_label(index, image.size)

    load = load_pair  # a stream source's reader (flyeva.data.stream); the image keeps decode_rgb's cap


def _images_in(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(
            f"image folder {folder} does not exist; check data.root / data.train / data.val"
        )
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not found:
        raise FileNotFoundError(f"no images under {folder}")
    return found


def _paired(images: Path, labels: Path, suffix: str) -> list[tuple[Path, Path]]:
    return [(p, labels / p.relative_to(images).with_name(p.stem + suffix)) for p in _images_in(images)]


def _folder_classes(cfg: DataSection) -> list[str]:
    if cfg.classes:
        return list(cfg.classes)
    listing = Path(cfg.root) / "classes.txt"
    if cfg.root and listing.is_file():
        return read_class_names(listing)
    raise ValueError("data.format=folder needs class names: set data.classes=[...] or write ROOT/classes.txt")


def open_split(cfg: DataSection, split: str) -> SegmentationPairs:
    """The pairs of `split` (train | val) for a data section whose ShapeWorld data already exists."""
    root = Path(cfg.root)
    if cfg.format == "ade20k":
        folder = {"train": "training", "val": "validation"}[split]
        pairs = _paired(root / "images" / folder, root / "annotations" / folder, ".png")
        return SegmentationPairs(pairs, ADE20K_CLASSES, label_lookup(150, True), zero_is_ignore=True)
    if cfg.format == "cocostuff":
        folder = {"train": "train2017", "val": "val2017"}[split]
        suffix = ".png" if cfg.raw_ids else "_labelTrainIds.png"
        pairs = _paired(root / "images" / folder, root / "annotations" / folder, suffix)
        return SegmentationPairs(pairs, COCO_STUFF_CLASSES, label_lookup(171, False, cfg.raw_ids))
    if cfg.format in ("folder", "shapeworld"):
        classes = SHAPEWORLD_CLASSES if cfg.format == "shapeworld" else _folder_classes(cfg)
        explicit = cfg.train if split == "train" else cfg.val
        folder = Path(explicit) if explicit else root / split
        pairs = _paired(folder / "images", folder / "labels", ".png")
        reduce = cfg.reduce_zero_label and cfg.format == "folder"
        return SegmentationPairs(pairs, classes, label_lookup(len(classes), reduce), zero_is_ignore=reduce)
    raise ValueError(f"data.format={cfg.format!r} is not one of {list(FORMATS)}")


def check_data_section(cfg: DataSection) -> None:
    if cfg.format not in FORMATS:
        raise ValueError(f"data.format={cfg.format!r} is not one of {list(FORMATS)}")
    objects = cfg.shapeworld_objects
    if len(objects) != 2 or not 1 <= objects[0] <= objects[1] <= 8:
        raise ValueError(f"data.shapeworld_objects must be [min, max], 1 <= min <= max <= 8; got {objects}")
    if cfg.format in ("ade20k", "cocostuff") and not cfg.root:
        raise ValueError(f"data.format={cfg.format} needs data.root=/path/to/the/dataset")
    if cfg.format == "folder" and not (cfg.root or (cfg.train and cfg.val)):
        raise ValueError(
            "data.format=folder needs data.root (with train/ and val/) or data.train and data.val"
        )


def ensure_shapeworld(cfg: DataSection, output_dir: Path) -> DataSection:
    """With format shapeworld and no root: export train/val semantic maps under OUTPUT/data once."""
    if cfg.format != "shapeworld" or cfg.root:
        return cfg
    from flyeva.data.export import export_split
    from flyeva.data.synthetic import ShapeWorld
    from flyeva.engine import distributed as D

    fewest, most = cfg.shapeworld_objects
    name = f"shapeworld_{cfg.shapeworld_size}px_seed{cfg.shapeworld_seed}_objects{fewest}-{most}"
    root = output_dir / "data" / name
    splits = {"train": (cfg.shapeworld_train, 0), "val": (cfg.shapeworld_val, 1)}
    if D.is_main():
        for split, (count, offset) in splits.items():
            done = root / split / "semantic" / "DONE"
            if done.is_file() and done.read_text() == str(count):
                continue
            seed = 2 * cfg.shapeworld_seed + offset
            world = ShapeWorld(cfg.shapeworld_size, seed, min_objects=fewest, max_objects=most)
            export_split(world, root / split, count, formats=["semantic"])
            done.write_text(str(count))
    D.barrier()
    return replace(
        cfg, root=str(root), train=str(root / "train" / "semantic"), val=str(root / "val" / "semantic")
    )
