"""`type: imagenet`: class folders labelled with ImageNet-1K class indices (IN-1K, -V2, -A, -R, -Sketch)."""

import logging
import os
from pathlib import Path

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import read_lines, shown
from flyeva.data.sources.folder import ImageFolderSource

logger = logging.getLogger(__name__)


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

    `classes` are the 1000 wnids in timm's order; `subset` lists the classes the set covers: its
    folders', or a `subset_file`'s (e.g. ImageNet-R's 200), which must include every folder.
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
                f"{root}: class folders {shown(outside)} are not in the subset {subset_file}; "
                "add them to the subset file or remove the folders"
            )
        if not subset_file and len(covered) < len(wnids):  # ImageNet-A/R hold 200 classes on purpose
            missing = shown([wnid for index, wnid in enumerate(wnids) if index not in covered], 5)
            logger.warning(
                f"{root} holds {len(covered)} of ImageNet's 1000 classes (missing e.g. {missing}): zero-shot "
                "scores only those; restore folders missing by mistake, or pass a subset file"
            )
        self.targets = [index_of[label] for label in self.targets or []]
        self.classes, self.class_to_idx = wnids, wnid_to_index


@register("imagenet", keys=("path", "subset", "class_map"), targets=("label",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> ImageNetFolderSource:
    return ImageNetFolderSource(config.path, config.subset, config.class_map, allow_empty_classes)
