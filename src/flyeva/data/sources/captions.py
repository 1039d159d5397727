"""`type: captions`: image-caption pairs from a CSV or TSV table with a header row (open_clip's layout)."""

import csv
import os
from pathlib import Path

from flyeva.data.sources import SourceConfig, register
from flyeva.data.sources.base import LocalImageFiles, UnreadableTargetError, clean_caption


def is_clean_utf8(text: str) -> bool:
    """False when the text came from invalid UTF-8 bytes (decoded with surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CaptionTableSource(LocalImageFiles):
    """Image-caption pairs from a CSV or TSV table with a header row, as open_clip's CsvDataset reads.

    `sep` None: from the extension. Relative paths resolve against `root`, else the table's folder.
    Files are not checked up front (tables hold millions of rows): a missing image is skipped later.
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
        return clean_caption(self.captions[index], f"row {index + 1} of {self.table.name}")


@register("captions", keys=("path", "root", "path_column", "caption_column", "sep"), targets=("caption",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> CaptionTableSource:
    return CaptionTableSource(
        config.path,
        root=config.root or None,
        path_column=config.path_column or "filepath",
        caption_column=config.caption_column or "title",
        sep=config.sep or None,
    )
