"""Labelled video lists: `path label` lists, Kinetics CSVs, folders per class, ShapeWorld clips.

The layouts and the class-name rules are docs/video.md's "Data". Integer labels without
`data.classes` must use every index up to the largest: one stray label such as 999 in a 10-class
list would otherwise make a 1000-class head.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flyeva.data.sources.base import read_class_names, read_utf8
from flyeva.data.synthetic import ShapeWorld

logger = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
LIST_TYPES = ("list", "kinetics", "folder", "shapeworld")


def read_index_rows(path: str | Path, what: str = "model.class_mapping") -> list[int]:
    """Integer indices from a .npy array (read without unpickling: the release's K722 -> K400 mapping
    is a plain int64 .npy) or a text file of one index per line; anything else is one ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    fix = "give a .npy array of integers (numpy.save, no pickle) or one integer per line"
    if path.suffix == ".npy":
        try:
            rows = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:  # pickled data, object arrays, bad headers
            raise ValueError(f"{what} {path} is not a plain .npy array ({error}); {fix}") from None
        if rows.dtype.kind not in "iu":
            raise ValueError(f"{what} {path} holds {rows.dtype} values, not integer indices; {fix}")
        return [int(row) for row in rows.reshape(-1)]
    words = read_utf8(path, "index list").split()
    for number, word in enumerate(words, start=1):
        if not word.lstrip("-").isdigit():
            raise ValueError(f"{what} {path}: entry {number} {word!r} is not an integer index; {fix}")
    return [int(word) for word in words]


@dataclass
class VideoList:
    """Video files with integer labels and the class names; `missing` = listed files not found."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    missing: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _integer_classes(names: list[str], where: str, lines: list[int]) -> list[str]:
    """Classes 0..max of integer labels, every one of which must label a video of the list."""
    values = [int(name) for name in names]
    if any(value < 0 for value in values):
        raise ValueError(f"{where}: label {min(values)} is negative; class indices start at 0")
    count = max(values) + 1 if values else 0
    unused = sorted(set(range(count)) - set(values))
    if unused:
        raise ValueError(
            f"{where}: integer labels without data.classes make {count} classes (0..{count - 1}), but "
            f"{len(unused)} of them label no video (e.g. {unused[:5]}); the largest label is "
            f"{count - 1} (line {lines[values.index(count - 1)]}): "
            "fix that label, or give data.classes (one class name per line) to fix the class list"
        )
    return [str(k) for k in range(count)]


def _video_list(
    files: list[Path], listed: list[str], lines: list[int], classes_file: str, where: str
) -> VideoList:
    """The listed videos that exist (the others named once in the log) with their class indices; the
    classes of integer labels come from the whole list as written (on `lines`), found on disk or not."""
    if not files:
        raise ValueError(f"{where}: the list names no videos; write one `path,label` line per video")
    found = [file.is_file() for file in files]
    kept = [str(file) for file, ok in zip(files, found) if ok]
    missing = [str(file) for file, ok in zip(files, found) if not ok]
    if missing:
        logger.warning(
            f"{where}: {len(missing)} of {len(files)} listed videos are missing, skipped (e.g. {missing[0]})"
        )
    if not kept:
        raise FileNotFoundError(
            f"{where}: none of the {len(files)} listed videos exists (e.g. {missing[0]}); check data.*.root"
        )
    names = [name for name, ok in zip(listed, found) if ok]
    if classes_file:
        classes = read_class_names(classes_file)
    elif all(name.lstrip("-").isdigit() for name in listed):
        classes = _integer_classes(listed, where, lines)
    else:
        classes = sorted(set(names))
    index = {name: k for k, name in enumerate(classes)}
    labels = []
    for name in names:
        if name in index:
            labels.append(index[name])
        elif name.isdigit() and int(name) < len(classes):
            labels.append(int(name))
        else:
            raise ValueError(
                f"{where}: label {name!r} is not in the class list ({len(classes)} classes); fix data.classes"
            )
    return VideoList(kept, labels, classes, missing)


def read_path_list(path: str | Path, root: str = "", classes_file: str = "") -> VideoList:
    """`path,label` / `path label` lines (an optional `path,label` header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video list {path} does not exist; set data.train.path / data.val.path")
    base = Path(root) if root else path.parent
    files, names, numbers = [], [], []
    for number, line in enumerate(read_utf8(path, "video list").splitlines(), start=1):
        line = line.strip()
        if not line or (number == 1 and line.lower().replace(" ", "") in ("path,label", "video,label")):
            continue
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'path,label' or 'path label', got {line!r}")
        files.append(base / parts[0].strip())
        names.append(parts[1].strip())
        numbers.append(number)
    return _video_list(files, names, numbers, classes_file, str(path))


def _kinetics_file(root: Path, row: dict[str, str]) -> Path:
    stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
    for folder in (root, root / row["label"], root / row["label"].replace(" ", "_")):
        for suffix in (".mp4", ".webm", ".mkv"):
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
    return root / f"{stem}.mp4"


def read_kinetics_csv(path: str | Path, root: str, classes_file: str = "") -> VideoList:
    """A Kinetics CSV with a header naming youtube_id, time_start, time_end and label."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Kinetics list {path} does not exist; set data.train.path / data.val.path")
    if not root:
        raise ValueError(
            f"{path}: a Kinetics list needs the video folder: set data.train.root / data.val.root"
        )
    rows = list(csv.DictReader(io.StringIO(read_utf8(path, "Kinetics CSV"), newline="")))
    needed = {"youtube_id", "time_start", "time_end", "label"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(
            f"{path}: a Kinetics CSV needs a header with {sorted(needed)}; use type=list for path,label"
        )
    files = [_kinetics_file(Path(root), row) for row in rows]
    lines = list(range(2, len(rows) + 2))  # after the header (a quoted newline shifts it: rare)
    return _video_list(files, [row["label"] for row in rows], lines, classes_file, str(path))


def read_folder(root: str | Path, classes_file: str = "") -> VideoList:
    """`root/<class>/<video>`: classes in sorted folder order (or the order of `classes_file`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {root} does not exist; expected root/<class>/<video>")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    classes = read_class_names(classes_file) if classes_file else [p.name for p in folders]
    index = {name: k for k, name in enumerate(classes)}
    paths, labels = [], []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(f"{root}: folder {folder.name!r} is not in data.classes")
        videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        paths += [str(p) for p in videos]
        labels += [index[folder.name]] * len(videos)
    if not paths:
        raise FileNotFoundError(f"{root} holds no videos ({', '.join(VIDEO_SUFFIXES)}) in class folders")
    return VideoList(paths, labels, classes)


def write_shapeworld_clips(
    out_dir: str | Path,
    num_clips: int,
    *,
    seed: int,
    image_size: int = 32,
    num_frames: int = 16,
    start: int = 0,
) -> Path:
    """ShapeWorld clips as H.264 files, `list.csv` (path,label) and `classes.txt`; the motion is the class.
    An existing complete list is reused. Returns the list file."""
    from flyeva.data.export import write_video_split

    out_dir = Path(out_dir)
    list_file = out_dir / "list.csv"
    if list_file.is_file() and len(list_file.read_text().splitlines()) == num_clips + 1:
        return list_file
    world = ShapeWorld(image_size=image_size, seed=seed, num_frames=num_frames)
    names = {index: f"{index:08d}" for index in range(start, start + num_clips)}
    return write_video_split(world, out_dir, names)


def load_video_list(kind: str, path: str, root: str = "", classes_file: str = "") -> VideoList:
    """A `VideoList` of one of LIST_TYPES (shapeworld lists are written first by the recipe)."""
    if kind in ("list", "shapeworld"):
        return read_path_list(path, root, classes_file)
    if kind == "kinetics":
        return read_kinetics_csv(path, root, classes_file)
    if kind == "folder":
        return read_folder(path or root, classes_file)
    raise ValueError(f"data type must be one of {', '.join(LIST_TYPES)}, got {kind!r}")
