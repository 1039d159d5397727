"""Local evaluation sets for zero-shot classification and retrieval (docs/recipes.md section 5, "Zero-shot").

- `folder`: ImageFolder layout (root/<class>/<image>); class names from a file (one per line, in
  sorted folder order) or from the folder names.
- `imagenet`: ImageNet-1K and its shifted variants. Class folders are named by wnid (IN-1K, -A,
  -R, -Sketch), by class index 0..999 (ImageNet-V2's release), or mapped by a `class_map` file
  ("folder<TAB>wnid or index"). The logits are restricted to a subset of the 1000 classes: the
  classes whose folders are present, or those listed in a `subset` file (wnids or indices).
- `cifar10` / `cifar100`: the original "python version" pickles, read without executing code.
- `shapeworld`: ShapeWorld scenes labelled by class (flyeva.data.synthetic), for the miniature.

Retrieval sets are captioned images: a CSV/TSV table (a path column and a caption column; an
image on several rows has several captions) or a folder of images with same-stem .txt sidecars
(the whole file is one caption, as in training: docs/data.md).
"""

from __future__ import annotations

import csv
import logging
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from flyeva.data.sources import IMAGE_EXTENSIONS, UnreadableImageError, decode_rgb, is_clean_utf8

WNID = re.compile(r"n\d{8}")
CIFAR_FILES = {
    "cifar10": {
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    "cifar100": {"train": ["train"], "test": ["test"], "meta": "meta"},
}
CIFAR_KEYS = {"cifar10": ("labels", "label_names"), "cifar100": ("fine_labels", "fine_label_names")}

logger = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """Images with labels in the column space of the restricted logits.

    `classnames` are the classifier's classes (all 1000 for ImageNet sets); `subset` lists the
    columns kept (None = all), and labels index into `subset` (or `classnames`).
    """

    name: str
    samples: list[Any]  # image paths, or HxWx3 uint8 arrays, or (source, index) pairs
    labels: list[int]
    classnames: list[str]
    subset: list[int] | None = None
    role: str = ""  # in1k | shift | "" (see zeroshot.ROLES)


# ---------------------------------------------------------------------------------------------------
# Small readers.


def read_lines(path: str | Path, what: str) -> list[str]:
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


def imagenet_classnames() -> list[str]:
    """OpenAI's cleaned ImageNet class names, in class-index order (shipped with open_clip)."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


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


def read_subset(path: str | Path) -> list[int]:
    """ImageNet class indices from a file of wnids or indices, one per line (e.g. ImageNet-R's 200)."""
    wnid_to_index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    indices = [
        imagenet_index(entry.split()[0], wnid_to_index, str(path)) for entry in read_lines(path, "subset")
    ]
    return sorted(set(indices))


def _class_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise ValueError(
            f"{root} has no class sub-folders; expected the ImageFolder layout root/<class>/<image>"
        )
    return folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# ---------------------------------------------------------------------------------------------------
# Classification sets.


def folder_set(name: str, root: str | Path, classnames_file: str = "", role: str = "") -> EvalSet:
    """ImageFolder layout; class names from `classnames_file` (sorted-folder order) or folder names."""
    folders = _class_folders(Path(root))
    if classnames_file:
        classnames = read_lines(classnames_file, "class-name")
        if len(classnames) != len(folders):
            raise ValueError(
                f"{classnames_file} names {len(classnames)} classes but {root} has {len(folders)} class "
                "folders; write one name per folder, in sorted folder order"
            )
    else:
        classnames = [folder.name.replace("_", " ") for folder in folders]
    samples, labels = [], []
    for label, folder in enumerate(folders):
        images = _images_in(folder)
        samples += images
        labels += [label] * len(images)
    empty = [folder.name for folder in folders if not _images_in(folder)]
    if empty:  # still scored as candidates, but no image of theirs is ever counted
        logger.warning("%s: %d class folders hold no images: %s", root, len(empty), ", ".join(empty[:10]))
    return EvalSet(name, samples, labels, classnames, role=role)


def imagenet_set(
    name: str, root: str | Path, subset_file: str = "", class_map_file: str = "", role: str = ""
) -> EvalSet:
    """An ImageNet-1K-labelled folder; logits restricted to the classes present or `subset_file`."""
    wnids = imagenet_wnids()
    wnid_to_index = {wnid: i for i, wnid in enumerate(wnids)}
    class_map = {}
    if class_map_file:
        for line in read_lines(class_map_file, "class map"):
            folder, _, target = line.replace("\t", " ").rpartition(" ")
            class_map[folder.strip()] = imagenet_index(target, wnid_to_index, class_map_file)
    folders = _class_folders(Path(root))
    folder_index = {
        f.name: class_map[f.name] if f.name in class_map else imagenet_index(f.name, wnid_to_index, str(root))
        for f in folders
    }
    subset = read_subset(subset_file) if subset_file else sorted(set(folder_index.values()))
    if not subset_file and len(subset) < len(wnids):
        missing = [wnids[i] for i in range(len(wnids)) if i not in set(subset)]
        logger.warning(
            "%s holds %d of ImageNet's %d classes: the classifier scores only those (as for ImageNet-A/R); "
            "missing e.g. %s. If folders are missing by mistake, restore them (or pass a subset file)",
            root,
            len(subset),
            len(wnids),
            ", ".join(missing[:5]),
        )
    column = {index: position for position, index in enumerate(subset)}
    samples, labels = [], []
    for folder in folders:
        if folder_index[folder.name] not in column:
            raise ValueError(
                f"{root}: class folder {folder.name} is not in the subset {subset_file}; "
                "add it to the subset file or remove the folder"
            )
        images = _images_in(folder)
        samples += images
        labels += [column[folder_index[folder.name]]] * len(images)
    return EvalSet(name, samples, labels, imagenet_classnames(), subset=subset, role=role)


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


def read_cifar_pickle(path: str | Path) -> dict[str, Any]:
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


def cifar_set(name: str, root: str | Path, kind: str, split: str = "test", role: str = "") -> EvalSet:
    """CIFAR-10/100 from the python-version folder: data_batch_*, test_batch, batches.meta (CIFAR-10)
    or train, test, meta (CIFAR-100)."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    root, files = Path(root), CIFAR_FILES[kind]
    label_key, names_key = CIFAR_KEYS[kind]
    classnames = [str(n).replace("_", " ") for n in read_cifar_pickle(root / files["meta"])[names_key]]
    samples, labels = [], []
    for file in files[split]:
        batch = read_cifar_pickle(root / file)
        pixels = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        samples += list(pixels)
        labels += [int(label) for label in batch[label_key]]
    return EvalSet(name, samples, labels, classnames, role=role)


def shapeworld_set(name: str, num_samples: int, seed: int, image_size: int, role: str = "") -> EvalSet:
    """ShapeWorld scenes labelled by class ("<shape> in the <quadrant>")."""
    from flyeva.data.synthetic import ShapeWorld, ShapeWorldSource

    world = ShapeWorld(image_size=image_size, seed=seed)
    source = ShapeWorldSource(world, num_samples, target="label")
    samples = [(source, index) for index in range(num_samples)]
    labels = [int(source.target(index)) for index in range(num_samples)]
    return EvalSet(name, samples, labels, list(world.class_names), role=role)


# ---------------------------------------------------------------------------------------------------
# Retrieval sets.


def captioned_set(
    path: str | Path, path_column: str = "filepath", caption_column: str = "title"
) -> tuple[list[Path], list[str], list[int]]:
    """(images, captions, image index of each caption) from a CSV/TSV table or a caption folder.

    The caption convention of docs/data.md: a caption file holds one caption (its whole text); an
    image with several captions has several table rows. A pair that is not valid UTF-8 is skipped,
    named in the log and counted.
    """
    path = Path(path)
    groups: dict[Path, list[str]] = {}
    skipped: list[str] = []
    if path.is_dir():
        for image in _images_in(path):
            sidecar = image.with_suffix(".txt")
            if not sidecar.is_file():
                continue
            try:
                groups[image] = [sidecar.read_text(encoding="utf-8").strip()]
            except UnicodeDecodeError:
                skipped.append(f"{sidecar} is not valid UTF-8")
    elif path.is_file():
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as file:
            reader = csv.DictReader(file, delimiter=delimiter)
            missing = {path_column, caption_column} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{path} has no column(s) {sorted(missing)}; its columns are {reader.fieldnames}"
                )
            for row in reader:
                if not (is_clean_utf8(row[path_column]) and is_clean_utf8(row[caption_column])):
                    skipped.append(f"{path} line {reader.line_num} is not valid UTF-8")
                    continue
                image = Path(row[path_column])
                image = image if image.is_absolute() else path.parent / image
                groups.setdefault(image, []).append(row[caption_column].strip())
    else:
        raise FileNotFoundError(f"retrieval set {path} does not exist; pass a caption table or folder")
    for reason in skipped:
        logger.warning("retrieval set: skipped a pair: %s", reason)
    groups = {image: [c for c in captions if c] for image, captions in groups.items()}
    groups = {image: captions for image, captions in groups.items() if captions}
    if not groups:
        raise ValueError(f"{path} has no captioned images")
    images, captions, owners = [], [], []
    for image_index, (image, texts) in enumerate(groups.items()):
        images.append(image)
        captions += texts
        owners += [image_index] * len(texts)
    return images, captions, owners


# ---------------------------------------------------------------------------------------------------
# Loading images for evaluation.


def _load(sample: Any) -> Image.Image:
    if isinstance(sample, np.ndarray):
        return Image.fromarray(sample)
    if isinstance(sample, tuple):  # (indexable source, index)
        source, index = sample
        return source.load(index)
    return decode_rgb(sample)


class EvalImages(Dataset):
    """Transformed images with labels; an unreadable image yields None and is counted, not fatal."""

    def __init__(
        self, samples: list[Any], labels: list[int], transform: Callable[[Image.Image], torch.Tensor]
    ):
        self.samples, self.labels, self.transform = samples, labels, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int]:
        try:
            return self.transform(_load(self.samples[index])), self.labels[index]
        except UnreadableImageError:
            return None, self.labels[index]


def _collate(items: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    kept = [(image, label) for image, label in items if image is not None]
    images = torch.stack([image for image, _ in kept]) if kept else None
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return images, labels, len(items) - len(kept)


def eval_loader(dataset: EvalImages, batch_size: int, num_workers: int) -> DataLoader:
    """Batches of (images or None, labels, number of unreadable images skipped), in order."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
