"""COCO-format instance datasets (COCO, LVIS v1, Objects365, the ShapeWorld export) for detection.

LVIS v1 images have no `file_name`: their path is the last two parts of `coco_url`, as detectron2
reads them. The file is checked whole first (`annotations.validate_coco`); a bad annotation value is
reported with its file and id, then repaired (box clipped) or dropped and counted in `usage`. An
image claiming more than `max_pixels` is left out whole; crowd regions are left out of training
targets (evaluation ignores them instead).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flyeva.data.sources import DEFAULT_MAX_PIXELS, UnreadableImageError, decode_rgb
from flyeva.tasks.detect.annotations import NAMED, Usage, finite_box, load_annotation_file, usable_polygons

logger = logging.getLogger(__name__)


@dataclass
class Instance:
    """One annotation kept for training: xyxy box in pixels, 0-based class, COCO segmentation."""

    box: tuple[float, float, float, float]
    label: int
    segmentation: Any  # list of polygons, or an RLE dict (counts list or string); None: box only


@dataclass
class ImageRecord:
    image_id: int
    path: Path
    height: int
    width: int
    instances: list[Instance] = field(default_factory=list)


def _image_path(image: dict[str, Any], root: Path) -> Path:
    if type(image.get("file_name")) is str:
        return root / image["file_name"]
    return root.joinpath(*image["coco_url"].split("/")[-2:])  # LVIS v1: .../train2017/000000391895.jpg


class CocoDetectionDataset:
    """Images and annotations of a COCO-format JSON; `problems` counts what was repaired or dropped,
    `usage` how much of the file is usable (see `annotations.check_usable`).

    With `masks=False` (a detector without a mask branch, `model.mask_head=false`) an annotation needs
    a box only: one without `segmentation` (Objects365) is kept, and segmentations are not read.
    """

    def __init__(
        self,
        json_path: str | Path,
        image_root: str | Path | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        masks: bool = True,
    ):
        self.json_path = Path(json_path)
        self.root = Path(image_root) if image_root else self.json_path.parent / "images"
        self.max_pixels = max_pixels
        self.with_masks = masks
        document = load_annotation_file(self.json_path)
        categories = sorted(document["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in categories]
        self.class_names = [c.get("name", str(c["id"])) for c in categories]
        self.image_counts = [c.get("image_count", 0) for c in categories]  # LVIS carries it
        self.problems: Counter[str] = Counter()
        self.usage = Usage()
        self.records = self._read_records(document)
        if not any(self.image_counts):  # COCO, Objects365: count images per class from the annotations
            counts = Counter(label for r in self.records for label in {i.label for i in r.instances})
            self.image_counts = [counts.get(k, 0) for k in range(len(categories))]

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.records)

    def _problem(self, kind: str, annotation: dict[str, Any], detail: str, dropped: bool = True) -> None:
        self.problems[kind] += 1
        if dropped:
            self.usage.dropped += 1
            if len(self.usage.first_dropped) < NAMED:
                self.usage.first_dropped.append(f"annotation {annotation['id']} ({kind})")
        if self.problems[kind] <= NAMED:  # the first few of each kind by name, then a count at the end
            logger.warning("%s: annotation %s: %s", self.json_path, annotation["id"], detail)

    def _skip_image(self, index: int, image: dict[str, Any], detail: str) -> None:
        kind = "image over max_pixels (skipped)"
        self.problems[kind] += 1
        self.usage.skipped_images += 1
        name = f"images[{index}] (id {image['id']}) {_image_path(image, self.root).name}"
        if len(self.usage.first_skipped) < NAMED:
            self.usage.first_skipped.append(name)
        if self.problems[kind] <= NAMED:
            logger.warning("%s: %s: %s", self.json_path, name, detail)

    def _read_records(self, document: dict[str, Any]) -> list[ImageRecord]:
        label_of = {cid: k for k, cid in enumerate(self.category_ids)}
        records: dict[int, ImageRecord] = {}
        skipped: set[int] = set()
        images, annotations = document.get("images", []), document.get("annotations", [])
        self.usage.images, self.usage.annotations = len(images), len(annotations)
        for index, image in enumerate(images):
            height, width = image["height"], image["width"]
            # The claim sizes every mask array of the image: capped like a decoded image's pixels.
            if self.max_pixels is not None and height * width > self.max_pixels:
                detail = (
                    f"claims {width}x{height} = {width * height} pixels, more than max_pixels="
                    f"{self.max_pixels}; its annotations are dropped (fix height/width in the file)"
                )
                self._skip_image(index, image, detail)
                skipped.add(image["id"])
                continue
            records[image["id"]] = ImageRecord(image["id"], _image_path(image, self.root), height, width)
        for annotation in annotations:
            image_id = annotation["image_id"]
            record = records.get(image_id)
            if record is None:
                if image_id in skipped:
                    self._problem("annotation of a skipped image", annotation, f"image {image_id} skipped")
                else:
                    self._problem("unknown image id", annotation, f"image_id {image_id} not listed")
                continue
            if annotation.get("iscrowd", 0):
                self.usage.crowd += 1  # crowd regions are ignored by evaluation and never trained on
                continue
            instance = self._instance(annotation, record, label_of)
            if instance is not None:
                record.instances.append(instance)
                self.usage.kept += 1
        self.usage.usable_images = sum(1 for r in records.values() if r.instances)
        if self.problems:
            logger.warning("%s: %s; %s", self.json_path, dict(self.problems), self.usage.summary())
        return list(records.values())

    def _instance(self, annotation: dict, record: ImageRecord, label_of: dict[int, int]) -> Instance | None:
        if annotation["category_id"] not in label_of:
            self._problem("unknown category id", annotation, f"category_id {annotation['category_id']}")
            return None
        bbox = annotation["bbox"]
        if not finite_box(bbox):
            self._problem("non-finite box", annotation, f"bbox {bbox}")
            return None
        x, y, w, h = (float(v) for v in bbox)
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(record.width), x + w), min(float(record.height), y + h)
        if x1 - x0 <= 0 or y1 - y0 <= 0:
            self._problem("zero-area box", annotation, f"bbox {[x, y, w, h]}")
            return None
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clipped = "box outside the image (clipped)"
            self._problem(clipped, annotation, f"bbox {[x, y, w, h]}", dropped=False)
        segmentation = annotation.get("segmentation")
        if not self.with_masks:
            return Instance((x0, y0, x1, y1), label_of[annotation["category_id"]], None)
        if isinstance(segmentation, list):
            polygons, reason = usable_polygons(segmentation, record.height, record.width)
            if not segmentation:
                self._problem("empty segmentation", annotation, "no polygon")
                return None
            if reason and polygons:  # the annotation stays, drawn from its usable polygons
                self._problem(reason, annotation, f"{reason} left out of the mask", dropped=False)
            elif reason:
                self._problem(reason, annotation, f"{reason}: no usable polygon")
                return None
            segmentation = polygons
        elif segmentation is None:
            detail = "no polygon or RLE (a box-only file trains with model.mask_head=false)"
            self._problem("missing segmentation", annotation, detail)
            return None
        return Instance((x0, y0, x1, y1), label_of[annotation["category_id"]], segmentation)

    def load_image(self, index: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
        """The RGB image, or `UnreadableImageError` (the stream skips and counts it).

        An image whose decoded size differs from the annotation file's claim is unreadable: its
        boxes and masks are in the claimed frame, so training on it would teach misplaced objects.
        """
        record = self.records[index]
        image = decode_rgb(record.path, max_pixels)
        if image.size != (record.width, record.height):
            raise UnreadableImageError(
                f"decodes to {image.width}x{image.height} but {self.json_path.name} claims "
                f"{record.width}x{record.height} (width x height) for image id {record.image_id}; "
                "fix height/width in the annotation file or replace the image"
            )
        return image

    load = load_image  # with `key`: an indexable source of `flyeva.data.stream`

    def key(self, index: int) -> str:
        return str(self.records[index].path)

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
            out[slot] = mask_util.decode(rle).astype(bool)  # validated: an RLE has its image's size
        return out

    def boxes(self, index: int) -> np.ndarray:
        """float32 [n, 4] xyxy boxes of image `index` in pixels (clipped to the image)."""
        instances = self.records[index].instances
        return np.array([i.box for i in instances], dtype=np.float32).reshape(len(instances), 4)

    def image_categories(self) -> list[list[int]]:
        """Classes present in each image (for repeat-factor sampling)."""
        return [[i.label for i in r.instances] for r in self.records]
