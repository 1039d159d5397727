"""Evaluation sets for zero-shot classification and retrieval (docs/recipes.md section 5, "Zero-shot").

Every set is a `flyeva.data.sources` source read by index (docs/data.md): a labelled one plus class
names for the prompts, or a captioned one for retrieval. ImageNet sets restrict the logits to the
classes they cover (`subset`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from flyeva.data.sources import SourceConfig, UnreadableTargetError, build_source, is_indexable, read_lines
from flyeva.data.stream import ImageBatchStream, build_loader

logger = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """A labelled source; labels index `subset` (the logit columns kept, None = all) or `classnames`."""

    name: str
    source: Any  # an indexable source (flyeva.data.sources)
    labels: list[int]
    classnames: list[str]
    subset: list[int] | None = None
    role: str = ""  # in1k | shift | "" (see zeroshot.ROLES)


def _indexable(source: Any, what: str) -> Any:
    if not is_indexable(source):
        raise ValueError(
            f"{what} is read by index: use a folder, list or table source, not webdataset shards"
        )
    return source


def eval_set(section: SourceConfig, name: str, classnames_file: str = "", role: str = "") -> EvalSet:
    """The labelled source `section` describes, with class names from `classnames_file` (one per line,
    in class order), open_clip's (ImageNet) or the source's (folder names, CIFAR's meta)."""
    try:
        source = build_source(section, target="label", allow_empty_classes=True)
    except ValueError as error:
        raise ValueError(f"dataset {name!r}: {error}") from None
    source = _indexable(source, f"dataset {name!r}")
    classes = getattr(source, "classes", None)
    if classnames_file:
        classnames = read_lines(classnames_file, "class-name")
        if classes is not None and len(classnames) != len(classes):
            raise ValueError(
                f"{classnames_file} names {len(classnames)} classes but {section.path} has {len(classes)}; "
                "write one name per class, in sorted folder order"
            )
    elif section.type == "imagenet":  # OpenAI's cleaned names, in class-index order (shipped with open_clip)
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        classnames = list(IMAGENET_CLASSNAMES)
    elif classes is None:
        raise ValueError(f"dataset {name!r}: a {section.type!r} source has no class names; set classnames")
    else:
        classnames = [str(label).replace("_", " ") for label in classes]
    targets = getattr(source, "targets", None) or [int(source.target(i)) for i in range(len(source))]
    subset = getattr(source, "subset", None)
    column = {index: position for position, index in enumerate(subset)} if subset else None
    labels = [column[target] for target in targets] if column else list(targets)
    return EvalSet(name, source, labels, classnames, subset=subset, role=role)


def caption_groups(section: SourceConfig) -> tuple[Any, list[int], list[str], list[int]]:
    """(source, source index of each distinct image, captions, image of each caption) of a retrieval set.

    Type "" means a caption folder for a folder, a table otherwise; a pair whose caption is missing,
    empty or not valid UTF-8 is skipped, named in the log and counted (docs/data.md)."""
    if not section.type:
        section = replace(section, type="caption_folder" if Path(section.path).is_dir() else "captions")
    source = _indexable(build_source(section, target="caption"), f"retrieval set {section.path}")
    images: list[int] = []
    position: dict[str, int] = {}
    captions, owners, skipped = [], [], []
    for index in range(len(source)):
        try:
            caption = source.target(index)
        except UnreadableTargetError as error:
            skipped.append(str(error))
            continue
        key = source.key(index)
        if key not in position:
            position[key] = len(images)
            images.append(index)
        captions.append(caption)
        owners.append(position[key])
    if skipped:
        logger.warning(
            "retrieval set %s: skipped %d pairs: %s", section.path, len(skipped), "; ".join(skipped[:5])
        )
    if not images:
        raise ValueError(f"retrieval set {section.path} has no captioned images")
    return source, images, captions, owners


def captioned_set(path: str | Path) -> tuple[list[Path], list[str], list[int]]:
    """(image paths, captions, image of each caption) of a caption table or folder (`caption_groups`)."""
    source, images, captions, owners = caption_groups(SourceConfig(type="", path=str(path)))
    return [Path(source.key(index)) for index in images], captions, owners


def eval_batches(source: Any, transform: Callable, batch_size: int, num_workers: int) -> DataLoader:
    """Batches ("images", "labels", "num_skipped") of an indexable source with int targets, each sample
    once: the stream every stage reads (flyeva.data.stream), which skips and counts unreadable images."""
    return build_loader(ImageBatchStream(source, transform, batch_size), num_workers)
