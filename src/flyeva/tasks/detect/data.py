"""COCO-format instance datasets (COCO, LVIS v1, Objects365, the ShapeWorld export) for detection.

One reader for every dataset: a COCO-style JSON and an image folder. LVIS v1 images have no
`file_name`; their path is the last two parts of `coco_url` (train2017/000000391895.jpg), as
detectron2 reads them, and the images' `not_exhaustive_category_ids` / `neg_category_ids` stay in
the JSON that evaluation reads. A bad annotation (box outside the image, zero area, unknown
category id, malformed polygon) is reported once with its file and id, then repaired (box clipped)
or dropped; crowd regions are left out of training targets (evaluation ignores them instead).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flyeva.data.sources import DEFAULT_MAX_PIXELS, decode_rgb

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    """One annotation kept for training: xyxy box in pixels, 0-based class, COCO segmentation."""

    box: tuple[float, float, float, float]
    label: int
    segmentation: Any  # list of polygons, or an RLE dict (counts list or string)


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    instances: list[Instance] = field(default_factory=list)


def _image_path(image: dict[str, Any], root: Path) -> Path:
    if "file_name" in image:
        return root / image["file_name"]
    if "coco_url" in image:  # LVIS v1: .../train2017/000000391895.jpg
        return root.joinpath(*image["coco_url"].split("/")[-2:])
    raise ValueError(f"image {image.get('id')} has neither file_name nor coco_url")


def _clean_polygons(polygons: list) -> list[list[float]]:
    """Polygons with an even number of at least 6 coordinates (3 points); others are malformed."""
    return [p for p in polygons if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]


class CocoDetectionDataset:
    """Images and annotations of a COCO-format JSON; `problems` counts what was repaired or dropped."""

    def __init__(self, json_path: str | Path, image_root: str | Path | None = None):
        self.json_path = Path(json_path)
        if not self.json_path.is_file():
            raise FileNotFoundError(
                f"annotation file {self.json_path} does not exist; set data.train_json/val_json"
            )
        self.root = Path(image_root) if image_root else self.json_path.parent / "images"
        try:
            document = json.loads(self.json_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{self.json_path} is not valid JSON ({error}); re-export or re-download it"
            ) from None
        categories = sorted(document.get("categories", []), key=lambda c: c["id"])
        if not categories:
            raise ValueError(f"{self.json_path} lists no categories; a detection dataset needs them")
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c.get("name", str(c["id"])) for c in categories]
        self.image_counts = [c.get("image_count", 0) for c in categories]  # LVIS carries it
        self.problems: Counter[str] = Counter()
        self.records = self._read_records(document)
        if not any(self.image_counts):  # COCO, Objects365: count images per class from the annotations
            counts = Counter(
                i.label for r in self.records for i in {x.label: x for x in r.instances}.values()
            )
            self.image_counts = [counts.get(k, 0) for k in range(len(categories))]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.records)

    def _problem(self, kind: str, annotation: dict[str, Any], detail: str) -> None:
        self.problems[kind] += 1
        if self.problems[kind] <= 5:  # the first few of each kind by name, then a count at the end
            logger.warning("%s: annotation %s: %s", self.json_path, annotation.get("id"), detail)

    def _read_records(self, document: dict[str, Any]) -> list[ImageRecord]:
        label_of = {cid: k for k, cid in enumerate(self.category_ids)}
        records = {}
        for image in document.get("images", []):
            records[image["id"]] = ImageRecord(
                image["id"], _image_path(image, self.root), int(image["height"]), int(image["width"])
            )
        for annotation in document.get("annotations", []):
            record = records.get(annotation.get("image_id"))
            if record is None:
                self._problem(
                    "unknown image id", annotation, f"image_id {annotation.get('image_id')} not listed"
                )
                continue
            instance = self._instance(annotation, record, label_of)
            if instance is not None:
                record.instances.append(instance)
        if self.problems:
            logger.warning("%s: %s", self.json_path, dict(self.problems))
        return list(records.values())

    def _instance(self, annotation: dict, record: ImageRecord, label_of: dict[int, int]) -> Instance | None:
        if annotation.get("iscrowd", 0):
            return None  # crowd regions are ignored by evaluation and never trained on
        if annotation.get("category_id") not in label_of:
            self._problem("unknown category id", annotation, f"category_id {annotation.get('category_id')}")
            return None
        try:
            x, y, w, h = (float(v) for v in annotation["bbox"])
        except (KeyError, TypeError, ValueError):
            self._problem("malformed box", annotation, f"bbox {annotation.get('bbox')!r}")
            return None
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(record.width), x + w), min(float(record.height), y + h)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            self._problem("box outside the image (clipped)", annotation, f"bbox {[x, y, w, h]}")
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            self._problem("zero-area box", annotation, f"bbox {[x, y, w, h]}")
            return None
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            cleaned = _clean_polygons(segmentation)
            if len(cleaned) != len(segmentation):
                self._problem(
                    "malformed polygon", annotation, "polygon with fewer than 3 points or odd length"
                )
            if not cleaned:
                return None
            segmentation = cleaned
        elif not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
            self._problem("missing segmentation", annotation, "no polygon or RLE")
            return None
        return Instance((x0, y0, x1, y1), label_of[annotation["category_id"]], segmentation)

    def load_image(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The RGB image, or `UnreadableImageError` (the stream skips and counts it)."""
        return decode_rgb(self.records[index].path, max_pixels)

    def masks(self, index: int) -> np.ndarray:
        """bool [n, H, W] instance masks of image `index` (polygons and RLE decoded)."""
        from faster_coco_eval.core import mask as mask_util

        record = self.records[index]
        out = np.zeros((len(record.instances), record.height, record.width), dtype=bool)
        for slot, instance in enumerate(record.instances):
            segmentation = instance.segmentation
            if isinstance(segmentation, list):
                rle = mask_util.merge(mask_util.frPyObjects(segmentation, record.height, record.width))
            elif isinstance(segmentation["counts"], list):
                rle = mask_util.frPyObjects(segmentation, record.height, record.width)
            else:
                rle = segmentation
            decoded = mask_util.decode(rle)
            if decoded.shape[:2] == out.shape[1:]:
                out[slot] = decoded.astype(bool)
        return out

    def image_categories(self) -> list[list[int]]:
        """Classes present in each image (for repeat-factor sampling)."""
        return [[i.label for i in r.instances] for r in self.records]
