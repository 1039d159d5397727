"""Class names of the benchmark datasets, index = training label (after reduce_zero_label for ADE20K).

The names are package data, one per line: `class_names/ade20k.txt` (ADE20K SceneParsing, 150 classes,
mmseg's `ADE20KDataset`: annotation value v is class v - 1, 0 = ignore) and `class_names/coco_stuff.txt`
(COCO-Stuff 164k, 171 classes, 80 things then 91 stuff: mmseg's `COCOStuffDataset`).
"""

from __future__ import annotations

from importlib.resources import files


def _names(file: str) -> list[str]:
    return (files(__package__) / "class_names" / file).read_text(encoding="utf-8").splitlines()


ADE20K_CLASSES = _names("ade20k.txt")
COCO_STUFF_CLASSES = _names("coco_stuff.txt")
# Raw COCO-Stuff PNGs (stuffthingmaps) store category id - 1; these 11 ids are unused in 2017, so the
# other 171 values map in order to 0..170 (mmseg's tools/convert_datasets/coco_stuff164k.py).
COCO_STUFF_UNUSED_RAW = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
