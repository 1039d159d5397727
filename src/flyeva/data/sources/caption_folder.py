"""`type: caption_folder`: images under a folder, each captioned by a sidecar file (a.jpg with a.txt)."""

import os
from pathlib import Path

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import LocalImageFiles, UnreadableTargetError, clean_caption, find_images


class CaptionFolderSource(LocalImageFiles):
    """Images under `root` (recursively), each captioned by a sidecar file (a.jpg with a.txt), read lazily."""

    target_type = str

    def __init__(self, root: str | os.PathLike):
        self.root = self.location = Path(root)
        self.paths = find_images(self.root)

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
        return clean_caption(text, f"caption file {sidecar.name}")


@register("caption_folder", keys=("path",), targets=("caption",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> CaptionFolderSource:
    return CaptionFolderSource(config.path)
