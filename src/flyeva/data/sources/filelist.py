"""`type: list`: images named one per line in a text file, optionally with a class label."""

import os
from pathlib import Path

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import LocalImageFiles


class FileListSource(LocalImageFiles):
    """Images named one per line in a text file, as `path` or `path<whitespace>label` (labels read only
    `with_labels`). Relative paths resolve against `root`, else the list's folder. `check_files`
    stats every path up front (off for millions of files on a slow file system: missing ones are then
    skipped at read time)."""

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


@register("list", keys=("path", "root", "check_files"), targets=("label",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> FileListSource:
    root = config.root or None
    return FileListSource(
        config.path, root=root, check_files=config.check_files, with_labels=target == "label"
    )
