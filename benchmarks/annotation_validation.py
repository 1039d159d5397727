"""Seconds to read an LVIS-sized COCO annotation file: JSON parse, the up-front schema check, the reader.

    python benchmarks/annotation_validation.py --annotations 200000

A synthetic LVIS-like file (20k images per 200k annotations, ~12-point polygons, `coco_url` paths)
is written once; each phase is timed on its own. LVIS v1 train holds 1.27M annotations: scale the
rows by about 6.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from flyeva.tasks.detect.annotations import validate_coco
from flyeva.tasks.detect.data import CocoDetectionDataset


def synthetic_lvis(count: int) -> dict:
    rng = np.random.default_rng(0)
    num_images = max(1, count // 10)
    images = [{"id": i, "coco_url": f"http://x/train2017/{i:012d}.jpg", "height": 480, "width": 640}
              for i in range(1, num_images + 1)]  # fmt: skip
    corners = np.stack([rng.uniform(0, 600, count), rng.uniform(0, 440, count)], 1).round(2)
    polygons = (np.tile(corners, 12) + rng.uniform(0, 40, (count, 24))).round(2).tolist()
    annotations = [{"id": k + 1, "image_id": k % num_images + 1, "category_id": 1 + k % 2,
                    "bbox": [*corners[k].tolist(), 40.0, 40.0], "area": 800.0, "iscrowd": 0,
                    "segmentation": [polygons[k]]} for k in range(count)]  # fmt: skip
    categories = [{"id": 1, "image_count": 5}, {"id": 2, "image_count": 3}]
    return {"images": images, "annotations": annotations, "categories": categories}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotations", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lvis.json"
        path.write_text(json.dumps(synthetic_lvis(args.annotations)))
        start = time.perf_counter()
        document = json.loads(path.read_text())
        parsed = time.perf_counter()
        validate_coco(document, path)
        validated = time.perf_counter()
        dataset = CocoDetectionDataset(path)
        read = time.perf_counter()
    print(f"{'annotations':>11} {'json s':>7} {'schema s':>8} {'reader s':>8} {'kept':>8} {'MB':>6}")
    size_mb = len(json.dumps(document)) / 1e6
    phases = f"{parsed - start:>7.2f} {validated - parsed:>8.2f} {read - validated:>8.2f}"
    print(f"{args.annotations:>11} {phases} {dataset.usage.kept:>8} {size_mb:>6.0f}")
    print("reader s = the whole CocoDetectionDataset constructor (its own parse and check included)")


if __name__ == "__main__":
    main()
