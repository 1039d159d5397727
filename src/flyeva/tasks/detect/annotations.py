"""COCO-format annotation files checked up front: one schema pass, geometry rules, usable-data checks.

A small explicit validator rather than pydantic: it checks LVIS's 1.2M annotations with a few type
tests each and words every error as `FILE: annotations[12] (id 345): 'bbox' must be ...; the fix`.
A record of the wrong *types* (a string bbox), or one the evaluator would crash on or score wrong
(duplicate ids, an RLE of the wrong size), makes the whole file invalid. A record whose *values*
cannot be trained on (a NaN polygon) is dropped by the reader and counted in `Usage`; `check_usable`
stops a run whose data is mostly unusable, and `evaluation_ground_truth` drops what would crash the
evaluator.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

if TYPE_CHECKING:
    from flyeva.tasks.detect.data import CocoDetectionDataset, ImageRecord

logger = logging.getLogger(__name__)

FIX = "fix or remove that record"
NAMED = 5  # how many dropped records and skipped images a summary names
# A polygon may reach this many image sides past the image: rasterizing one costs memory in
# proportion to its extent, and a coordinate of 1e12 would exhaust it.
POLYGON_REACH = 1.0
_NUMBER = (int, float)  # `type(v) in _NUMBER` leaves out bool, which json never gives for a number
LVIS_FREQUENCIES = ("r", "c", "f")


def _show(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _where(section: str, index: int, record: Any) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"{section}[{index}] (id {record_id})" if type(record_id) is int else f"{section}[{index}]"


def _refuse(path: Path, where: str, problem: str, fix: str = FIX) -> None:
    raise ValueError(f"{path}: {where}: {problem}; {fix}")


def _check_record(section: str, kind: str, index: int, record: Any, seen: dict[int, int], path: Path) -> str:
    """Where `record` is (for messages), once it is an object with an integer id not seen before."""
    where = _where(section, index, record)
    if type(record) is not dict:
        _refuse(path, where, f"must be an object, got {_show(record)}")
    record_id = record.get("id")
    if type(record_id) is not int:
        _refuse(path, where, f"'id' must be an integer, got {_show(record_id)}")
    if record_id in seen:
        fix = f"{kind} ids must be unique; renumber or remove one"
        _refuse(path, where, f"duplicate {kind} id {record_id} (also {section}[{seen[record_id]}])", fix)
    seen[record_id] = index
    return where


def rle_string_total(counts: str) -> int | None:
    """The summed runs of a COCO compressed RLE string (pycocotools' rleFrString), None if malformed."""
    runs: list[int] = []
    total, position, length = 0, 0, len(counts)
    while position < length:
        value, shift, more = 0, 0, True
        while more:
            if position >= length:
                return None  # the last run stops mid-number
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]  # runs after the second are coded as deltas against the run two back
        if value < 0:
            return None
        runs.append(value)
        total += value
    return total


def _check_section(document: dict, name: str, path: Path) -> list:
    section = document.get(name, [])
    if type(section) is not list:
        problem = f"must be a list of objects, got a {type(section).__name__}"
        _refuse(path, f"'{name}'", problem, "give a COCO-format instances file")
    return section


def _check_categories(categories: list, path: Path) -> None:
    seen: dict[int, int] = {}
    for index, category in enumerate(categories):
        where = _check_record("categories", "category", index, category, seen, path)
        if "name" in category and type(category["name"]) is not str:
            _refuse(path, where, f"'name' must be a string, got {_show(category['name'])}")
        count = category.get("image_count", 0)
        if type(count) not in _NUMBER or not math.isfinite(count) or count < 0:
            _refuse(path, where, f"'image_count' must be a count of images (>= 0), got {_show(count)}")
        frequency = category.get("frequency", "f")
        if frequency not in LVIS_FREQUENCIES:
            _refuse(path, where, f"'frequency' must be one of r, c, f (LVIS), got {_show(frequency)}")


def _check_images(images: list, path: Path) -> dict[int, tuple[int, int]]:
    """Image id -> (height, width), after checking every image record."""
    sizes: dict[int, tuple[int, int]] = {}
    first: dict[int, int] = {}
    for index, image in enumerate(images):
        where = _check_record("images", "image", index, image, first, path)
        for key in ("height", "width"):
            value = image.get(key)
            if type(value) is not int or not 0 < value < 2**31:
                _refuse(path, where, f"'{key}' must be a positive integer (pixels), got {_show(value)}")
        if type(image.get("file_name")) is not str and type(image.get("coco_url")) is not str:
            _refuse(path, where, "has neither 'file_name' nor 'coco_url' (a string)")
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):  # LVIS
            ids = image.get(key, [])
            if type(ids) is not list or any(type(v) is not int for v in ids):
                _refuse(path, where, f"'{key}' must be a list of category ids, got {_show(ids)}")
        sizes[image["id"]] = (image["height"], image["width"])
    return sizes


def _check_rle(rle: dict, where: str, path: Path, size: tuple[int, int] | None) -> None:
    shape, counts = rle.get("size"), rle.get("counts")
    if type(shape) is not list or len(shape) != 2 or any(type(v) is not int or v < 0 for v in shape):
        _refuse(path, where, f"RLE 'segmentation.size' must be [height, width], got {_show(shape)}")
    if size is not None and tuple(shape) != size:
        problem = (
            f"'segmentation' is an RLE of size {shape[0]}x{shape[1]} but its image is {size[0]}x{size[1]}"
        )
        _refuse(path, where, problem + " (height x width)", "re-encode the mask at its image's size")
    pixels = shape[0] * shape[1]
    if type(counts) is list:
        if any(type(v) is not int or v < 0 for v in counts) or sum(counts) != pixels:
            _refuse(path, where, f"RLE 'segmentation.counts' must be runs summing to {pixels} pixels")
    elif type(counts) is str:
        if rle_string_total(counts) != pixels:
            _refuse(path, where, f"RLE 'segmentation.counts' is not a compressed RLE of {pixels} pixels")
    else:
        _refuse(path, where, f"RLE 'segmentation.counts' must be a list or a string, got {_show(counts)}")


def _numbers(value: Any) -> bool:
    """Whether `value` is a list of numbers."""
    if type(value) is not list:
        return False
    try:
        sum(value)  # a TypeError for any entry that is not a number, in C
    except TypeError:
        return False
    return True


def _check_annotations(annotations: list, sizes: dict[int, tuple[int, int]], path: Path) -> None:
    seen: dict[int, int] = {}
    for index, annotation in enumerate(annotations):
        where = _check_record("annotations", "annotation", index, annotation, seen, path)
        for key in ("image_id", "category_id"):
            if type(annotation.get(key)) is not int:
                _refuse(path, where, f"'{key}' must be an integer, got {_show(annotation.get(key))}")
        bbox = annotation.get("bbox")
        if type(bbox) is not list or len(bbox) != 4 or not _numbers(bbox):
            _refuse(path, where, f"'bbox' must be 4 numbers [x, y, width, height], got {_show(bbox)}")
        if annotation.get("iscrowd", 0) not in (0, 1):
            _refuse(path, where, f"'iscrowd' must be 0 or 1, got {_show(annotation['iscrowd'])}")
        if "area" in annotation and type(annotation["area"]) not in _NUMBER:
            _refuse(path, where, f"'area' must be a number, got {_show(annotation['area'])}")
        segmentation = annotation.get("segmentation")
        if type(segmentation) is list:
            for polygon in segmentation:
                if not _numbers(polygon):
                    problem = f"'segmentation' polygons must be lists of numbers, got {_show(polygon)}"
                    _refuse(path, where, problem)
        elif type(segmentation) is dict:
            _check_rle(segmentation, where, path, sizes.get(annotation["image_id"]))
        elif segmentation is not None:
            problem = f"'segmentation' must be a list of polygons or an RLE object, got {_show(segmentation)}"
            _refuse(path, where, problem)


def validate_coco(document: Any, path: str | Path) -> None:
    """Raise ValueError naming the file, the record and the field of the first schema error."""
    path = Path(path)
    if type(document) is not dict:
        problem = f"is a {type(document).__name__}, not an object with images, annotations and categories"
        _refuse(path, "the top level", problem, "give a COCO-format instances file")
    categories = _check_section(document, "categories", path)
    if not categories:
        raise ValueError(f"{path} lists no categories; a detection dataset needs them")
    _check_categories(categories, path)
    sizes = _check_images(_check_section(document, "images", path), path)
    _check_annotations(_check_section(document, "annotations", path), sizes, path)


def load_annotation_file(path: str | Path) -> dict[str, Any]:
    """The parsed and validated COCO-format document at `path`; ValueError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist; set data.train_json/val_json")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-export or re-download it") from None
    except RecursionError:  # nesting deeper than the parser's stack
        raise ValueError(f"{path} nests too deeply to be a COCO file; re-export or re-download it") from None
    validate_coco(document, path)
    return document


# ----- geometry: what the reader and the evaluator can use -----------------------------------------


def finite_box(bbox: list) -> bool:
    return all(math.isfinite(v) for v in bbox)


def usable_polygons(polygons: list, height: int, width: int) -> tuple[list[list[float]], str | None]:
    """The polygons a mask can be drawn from, and why any others were left out (None if none were)."""
    reach = POLYGON_REACH * max(height, width)
    kept, reason = [], None
    for polygon in polygons:
        if len(polygon) < 6 or len(polygon) % 2:
            reason = reason or "malformed polygon"
        elif not math.isfinite(sum(polygon)):  # NaN or inf anywhere makes the sum non-finite
            reason = reason or "non-finite polygon"
        elif min(polygon) < -reach or max(polygon) > reach + max(height, width):
            reason = reason or "polygon far outside the image"
        else:
            kept.append(polygon)
    return kept, reason


def evaluation_ground_truth(path: str | Path) -> dict[str, Any]:
    """The validated document at `path` without annotations the evaluator cannot score.

    A non-finite box, or a polygon segmentation of which no polygon is usable (a NaN polygon makes
    the mask rasterizer exhaust memory), is removed and counted; partly bad polygons are trimmed.
    """
    document = load_annotation_file(path)
    sizes = {image["id"]: (image["height"], image["width"]) for image in document.get("images", [])}
    kept, removed = [], []
    for annotation in document.get("annotations", []):
        size = sizes.get(annotation["image_id"])
        segmentation = annotation.get("segmentation")
        if not finite_box(annotation["bbox"]):
            removed.append(annotation["id"])
            continue
        if type(segmentation) is list and size is not None:
            polygons, reason = usable_polygons(segmentation, *size)
            if not polygons:
                removed.append(annotation["id"])
                continue
            if reason:
                annotation["segmentation"] = polygons
        kept.append(annotation)
    if removed:
        logger.warning(
            "%s: %d annotations left out of evaluation (non-finite box or no usable polygon), ids %s",
            path,
            len(removed),
            removed[:NAMED],
        )
    document["annotations"] = kept
    return document


# ----- how much of a dataset is usable ------------------------------------------------------------


@dataclass
class Usage:
    """What a `CocoDetectionDataset` kept of its file: counts, and the first few records it left out."""

    images: int = 0  # image records listed
    usable_images: int = 0  # images with at least one training instance
    skipped_images: int = 0  # left out whole (claimed size over max_pixels)
    annotations: int = 0  # annotation records listed
    kept: int = 0  # training instances
    crowd: int = 0  # crowd regions: never trained on, not a fault
    dropped: int = 0
    first_dropped: list[str] = field(default_factory=list)  # "annotation 345 (zero-area box)"
    first_skipped: list[str] = field(default_factory=list)  # "images[3] (id 7) x.jpg (...)"

    def summary(self) -> str:
        text = (
            f"{self.usable_images} of {self.images} images usable, {self.kept} of {self.annotations} "
            f"annotations kept, {self.dropped} dropped"
        )
        if self.first_dropped:
            text += f" (first: {', '.join(self.first_dropped)})"
        if self.skipped_images:
            text += f", {self.skipped_images} images skipped (first: {', '.join(self.first_skipped)})"
        return text


def _header_problem(record: ImageRecord) -> str | None:
    """Why the record's image cannot be used as annotated, from its header alone; None if it can."""
    path = record.path
    if not path.is_file():
        return f"{path} does not exist"
    try:
        with Image.open(path) as image:
            size = image.size
    except Exception as error:  # untrusted bytes: PIL plugins raise many exception types
        return f"{path} is not a readable image ({type(error).__name__})"
    if size != (record.width, record.height):
        claim = f"{record.width}x{record.height} (width x height)"
        return f"{path} is {size[0]}x{size[1]} but the annotation file claims {claim}"
    return None


def check_usable(dataset: CocoDetectionDataset, min_fraction: float = 0.5, probe_images: int = 8) -> None:
    """Raise ValueError when `dataset` cannot train: no image with a usable annotation; fewer than
    `min_fraction` of the non-crowd annotations kept; or more than 1 - `min_fraction` of `probe_images`
    usable images, spread over the dataset, missing, unreadable or of another size than claimed
    (headers only). Fewer bad probes are a warning: the stream skips and counts those images."""
    usage, where = dataset.usage, dataset.json_path
    fix = "fix the annotation file or give another one"
    if dataset.problems.get("missing segmentation"):  # a box-only file (Objects365) given to a mask detector
        fix = "a file without masks trains a box-only detector: model.mask_head=false; or " + fix
    if usage.usable_images == 0:
        raise ValueError(f"{where}: no image has a usable annotation ({usage.summary()}); {fix}")
    trainable = usage.annotations - usage.crowd
    if usage.dropped > (1 - min_fraction) * trainable:
        raise ValueError(
            f"{where}: {usage.dropped} of {trainable} annotations were dropped, more than "
            f"{1 - min_fraction:.0%} ({usage.summary()}); {fix}"
        )
    usable = [record for record in dataset.records if record.instances]
    count = min(probe_images, len(usable))
    picks = sorted({k * (len(usable) - 1) // max(count - 1, 1) for k in range(count)})
    problems = [problem for k in picks if (problem := _header_problem(usable[k])) is not None]
    if problems and len(problems) > (1 - min_fraction) * len(picks):
        raise ValueError(
            f"{where}: {len(problems)} of {len(picks)} probed images cannot be used "
            f"({'; '.join(problems[:3])}); check the image folder (data.train_root/val_root) and the "
            "images' height/width in the annotation file"
        )
    if problems:
        logger.warning(
            "%s: %d of %d probed images cannot be used: %s", where, len(problems), len(picks), problems
        )
