"""`type: folder`: every image under a folder; with labels, the ImageFolder layout `path/<class>/<image>`."""

import logging
import os
from pathlib import Path

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import LocalImageFiles, find_images, shown

logger = logging.getLogger(__name__)


class ImageFolderSource(LocalImageFiles):
    """Every image under `root`, recursively, in sorted path order; `with_labels=True` reads the
    ImageFolder layout (class = first-level sub-folder, sorted). An empty class folder or an image
    directly under `root` would shift label indices silently, so both are refused
    (`allow_empty_classes` only warns, for evaluation sets whose classes are candidates to score)."""

    def __init__(self, root: str | os.PathLike, with_labels: bool = False, allow_empty_classes: bool = False):
        self.root = self.location = Path(root)
        self.paths = find_images(self.root)
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
                f"{len(top_level)} images lie directly under {self.root} (first: {shown(top_level)}), "
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
            logger.warning("%s: %d class folders hold no images: %s", self.root, len(empty), shown(empty))
        elif empty:
            raise ValueError(
                f"{len(empty)} class folders under {self.root} hold no images: {shown(empty, 10)}; "
                f"they would still take a class index, so remove them or add their images "
                f"(symlinked folders are not followed)"
            )


@register("folder", keys=("path",), targets=("label",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> ImageFolderSource:
    return ImageFolderSource(
        config.path, with_labels=target == "label", allow_empty_classes=allow_empty_classes
    )
