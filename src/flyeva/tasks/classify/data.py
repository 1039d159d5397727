"""Labelled data for classification: sources, the release's fine-tuning augmentation, batch streams.

Each split is a list of data sources (docs/data.md), concatenated in order: ImageFolder roots,
ImageNet-labelled folders, list files with labels, CIFAR, webdataset shards whose samples carry a
`.cls` member, or the synthetic ShapeWorld; `data.root` is the ImageFolder train/val layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from flyeva.data.sharding import RankShard
from flyeva.data.sources import ConcatSource, SourceConfig, UnreadableImageError, build_source, is_indexable
from flyeva.data.stream import ImageBatchStream, rank_permutation
from flyeva.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform, seeded_host_rngs


@dataclass
class DataSection:
    root: str = ""  # ImageFolder layout: root/train/<class>/*, root/val/<class>/* (or set train/val)
    train: list[SourceConfig] = field(default_factory=list)  # concatenated in order
    val: list[SourceConfig] | None = None  # None = root/val; [] = train without evaluation
    num_classes: int = 0  # 0 = from the data; required for webdataset shards
    crop_pct: float = 1.0  # evaluation: Resize(size / crop_pct, bicubic) + CenterCrop, the release's 1.0
    max_val_batches: int = 0  # 0 = the whole validation set


@dataclass
class AugSection:
    """Training augmentation; defaults are the release's IN-1K fine-tuning (docs/recipes.md §4)."""

    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # RandAugment m9; "" = off
    color_jitter: float = 0.4  # timm ignores it while RandAugment is on
    reprob: float = 0.0  # random erasing probability (the release: 0)
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0  # mixup alpha
    cutmix: float = 0.0  # cutmix alpha
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1  # label smoothing


class TrainTransform:
    """timm's ImageNet training transform (RandomResizedCrop, flip, RandAugment, random erasing); its
    Python and NumPy draws are seeded from torch's generator, which `ImageBatchStream` seeds per sample."""

    def __init__(self, image_size: int, aug: AugSection):
        from timm.data import create_transform

        self.image_size = image_size
        self.pipeline = create_transform(
            image_size,
            is_training=True,
            scale=tuple(aug.scale),
            ratio=tuple(aug.ratio),
            hflip=aug.hflip,
            color_jitter=aug.color_jitter,
            auto_augment=aug.auto_augment or None,
            interpolation="bicubic",
            re_prob=aug.reprob,
            re_mode=aug.remode,
            re_count=aug.recount,
            mean=CLIP_MEAN,
            std=CLIP_STD,
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        with seeded_host_rngs(int(torch.randint(0, 2**31 - 1, (1,)))):
            return self.pipeline(image)

    def __repr__(self) -> str:
        return f"TrainTransform({self.pipeline})"


def build_labeled_source(sections: list[SourceConfig], role: str) -> Any:
    """One split's sources end to end, with integer class labels (ShapeWorld defaults to 1024 scenes)."""
    if not sections:
        raise ValueError(f"no {role} data: set data.root (ImageFolder layout) or data.{role}")
    sections = [
        replace(s, num_samples=1024) if s.type == "shapeworld" and not s.num_samples else s for s in sections
    ]
    try:
        sources = [build_source(section, target="label") for section in sections]
        return sources[0] if len(sources) == 1 else ConcatSource(sources)
    except ValueError as error:
        raise ValueError(f"data.{role}: {error}") from None


def resolve_sections(data: DataSection) -> tuple[list[SourceConfig], list[SourceConfig]]:
    """Train and validation sources ([] = no evaluation); `data.root` is the ImageFolder train/val layout."""
    train, val = data.train, data.val
    if data.root:
        root = Path(data.root)
        if not (root / "train").is_dir():
            raise FileNotFoundError(
                f"no training folder {root / 'train'}; data.root needs root/train/<class>/, root/val/<class>/"
            )
        train = [SourceConfig(type="folder", path=str(root / "train"))]
        if val is None or (val and not any(source.path for source in val)):  # keeps a val given by path
            if not (root / "val").is_dir():
                raise FileNotFoundError(
                    f"no validation folder {root / 'val'}; add root/val/<class>/ images, "
                    "set data.val, or data.val=[] to train without evaluation"
                )
            val = [SourceConfig(type="folder", path=str(root / "val"))]
    if val is None:
        raise ValueError(
            "no validation data: set data.root or data.val (data.val=[] trains without evaluation)"
        )
    return train, val


def source_classes(source: Any, num_classes: int) -> tuple[int, list[str] | None]:
    """The number of classes and their names (when the source knows them)."""
    classes = getattr(source, "classes", None)
    if classes:
        if num_classes and num_classes != len(classes):
            raise ValueError(
                f"data.num_classes={num_classes} but the data has {len(classes)} classes; "
                "remove data.num_classes or fix the data"
            )
        return len(classes), list(classes)
    if num_classes:
        return num_classes, None
    if targets := getattr(source, "targets", None):
        return max(targets) + 1, None
    raise ValueError("cannot tell the number of classes of webdataset shards; set data.num_classes")


def check_same_classes(train_classes: list[str] | None, val_classes: list[str] | None) -> None:
    """Folder labels are indices into sorted class names: the two splits must name the same classes."""
    if train_classes is None or val_classes is None or train_classes == val_classes:
        return
    missing = sorted(set(train_classes) - set(val_classes))
    extra = sorted(set(val_classes) - set(train_classes))
    raise ValueError(
        f"validation classes differ from training classes (missing in val: {missing[:5]}, not in train: "
        f"{extra[:5]}); labels would shift: give both splits the same class folders"
    )


def eval_stream(source: Any, image_size: int, crop_pct: float, batch_size: int, rank: int, world: int, **kw):
    """This rank's share of an evaluation set, each sample exactly once over all ranks when indexable."""
    transform = EvalTransform(image_size, crop_pct)  # CLIP mean/std, as pretraining
    if is_indexable(source):
        return ImageBatchStream(RankShard(source, rank, world), transform, batch_size, 0, 1, **kw)
    return ImageBatchStream(source, transform, batch_size, rank, world, **kw)


class FeatureBatchStream(IterableDataset):
    """Cached features and labels in `ImageBatchStream`'s batch order (its `rank_permutation`), whole
    batches sliced from the tensors with no per-sample work, in one process (num_workers=0)."""

    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.features, self.labels = features, labels
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.drop_last = seed, drop_last
        self.samples = len(labels) // world_size
        self.epoch, self.skip = 0, 0
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(labels)} cached samples give no batch of {batch_size} on each of {world_size} ranks; "
                "lower the batch size"
            )

    def set_epoch(self, epoch: int, skip: Sequence[int] = ()) -> None:
        if len(skip) > 1:
            raise ValueError("cached features stream from one process: resume with num_workers=0")
        self.epoch, self.skip = epoch, int(skip[0]) if skip else 0

    def num_batches(self, num_workers: int = 0) -> int:
        full, rest = divmod(self.samples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ValueError("FeatureBatchStream runs in one process; use num_workers=0 or 1")
        order = rank_permutation(len(self.labels), self.seed, self.epoch, self.rank, self.world_size)
        for index in range(self.skip, self.num_batches()):
            chosen = order[index * self.batch_size : (index + 1) * self.batch_size]
            batch = {"images": self.features[chosen], "labels": self.labels[chosen]}
            yield batch | {"num_skipped": 0, "worker": 0, "index": index}


@dataclass
class LabeledData:
    """The resolved sources of a classification run and its label set."""

    train: Any
    val: Any | None
    num_classes: int
    classes: list[str] | None


def check_every_class_readable(source: Any) -> None:
    """Refuse to train when a class has no image that decodes (it would train with exit 0, unlearnable);
    one successful decode per class suffices, so a healthy data set costs one image per class."""
    targets, classes = getattr(source, "targets", None), getattr(source, "classes", None)
    if not targets or not classes:
        return  # streamed or generated sources: their unreadable samples are counted per epoch
    readable: set[int] = set()
    for index, label in enumerate(targets):
        if label not in readable:
            with contextlib.suppress(UnreadableImageError):
                source.load(index)
                readable.add(label)
    unusable = [classes[label] for label in sorted(set(targets) - readable)]
    if unusable:
        raise ValueError(
            f"{len(unusable)} classes have no readable training image: {unusable[:10]}; fix or remove their "
            "images (every one of them failed to decode)"
        )


def prepare_data(data: DataSection, need_val: bool = False) -> LabeledData:
    """Build the train (and validation) sources, count the classes, check that the splits agree."""
    train_section, val_section = resolve_sections(data)
    train = build_labeled_source(train_section, "train")
    check_every_class_readable(train)
    num_classes, classes = source_classes(train, data.num_classes)
    if not val_section:
        if need_val:
            raise ValueError("this evaluation needs validation data: set data.root or data.val")
        return LabeledData(train, None, num_classes, classes)
    val = build_labeled_source(val_section, "val")
    check_same_classes(classes, getattr(val, "classes", None))
    return LabeledData(train, val, num_classes, classes)
