"""COCO / LVIS evaluation against the reference evaluators, with detectron2's conventions.

References: pycocotools' COCOeval and the lvis package's LVISEval, fed as detectron2's
`COCOEvaluator` / `LVISEvaluator` feed them (mask results without their `bbox`). Tolerance 1e-12:
faster-coco-eval reproduces both to rounding (1.1e-16 measured).
"""

import copy
import json
import math

import lvis
import numpy as np
import pytest
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from flyeva.tasks.detect.evaluate import COCO_NAMES, LVIS_NAMES, coco_evaluate, federated_results

SIZE_BINS = (32**2, 96**2)  # COCO's small / medium / large area limits


def rle(mask: np.ndarray) -> dict:
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode()}


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def size_bin(area: float) -> int:
    return sum(area > limit for limit in SIZE_BINS)


def l_shape(size: int, top: int, left: int, side: int, thick: int) -> np.ndarray:
    """An L whose box (side^2) is much larger than its mask (2 side thick - thick^2)."""
    mask = np.zeros((size, size), bool)
    mask[top : top + side, left : left + thick] = True
    mask[top + side - thick : top + side, left : left + side] = True
    return mask


def reference_coco(gt: dict, results: list[dict], iou_type: str) -> np.ndarray:
    """pycocotools' 12 stats; for masks the results lose `bbox` first, as detectron2's COCOEvaluator."""
    ground_truth = COCO()
    ground_truth.dataset = copy.deepcopy(gt)
    ground_truth.createIndex()
    detections = copy.deepcopy(results)
    if iou_type == "segm":
        for detection in detections:
            detection.pop("bbox", None)
    if detections:
        loaded = ground_truth.loadRes(detections)
    else:  # loadRes cannot take an empty list: an index with the set's images and no annotations
        loaded = COCO()
        loaded.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
        loaded.createIndex()
    evaluator = COCOeval(ground_truth, loaded, iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats


@pytest.fixture(scope="module")
def l_shape_set():
    """L-shaped objects whose mask and box areas fall into different COCO size bins, and detections."""
    rng = np.random.default_rng(0)
    size = 200
    shapes = [(40, 6), (110, 14), (60, 25), (150, 60)]  # mask/box bins: s/m, m/l, m/m, l/l
    images, annotations, results = [], [], []
    for image_id in range(1, 7):
        images.append({"id": image_id, "height": size, "width": size, "file_name": f"{image_id}.jpg"})
        for index in rng.choice(len(shapes), 3):
            side, thick = shapes[index]
            top, left = (int(v) for v in rng.integers(0, size - side, 2))
            mask = l_shape(size, top, left, side, thick)
            category = int(rng.integers(1, 4))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": tight_box(mask), "area": float(mask.sum()), "iscrowd": 0,
                                "segmentation": rle(mask)})  # fmt: skip
            for _ in range(2):  # shifted copies, some of the wrong category
                shifted = np.roll(mask, tuple(rng.integers(-5, 6, 2)), axis=(0, 1))
                label = category if rng.random() < 0.75 else int(rng.integers(1, 4))
                results.append({"image_id": image_id, "category_id": label, "bbox": tight_box(shifted),
                                "score": float(rng.random()), "segmentation": rle(shifted)})  # fmt: skip
        for _ in range(3):  # unmatched L shapes of every size
            side, thick = shapes[int(rng.integers(len(shapes)))]
            top, left = (int(v) for v in rng.integers(0, size - side, 2))
            mask = l_shape(size, top, left, side, thick)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 4)),
                            "bbox": tight_box(mask), "score": float(rng.random()),
                            "segmentation": rle(mask)})  # fmt: skip
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    return {"images": images, "annotations": annotations, "categories": categories}, results


def test_mask_ap_by_size_uses_mask_areas_as_detectron2_and_pycocotools(l_shape_set):
    gt, results = l_shape_set
    mask_bins = [size_bin(coco_mask.area(r["segmentation"])) for r in results]
    box_bins = [size_bin(r["bbox"][2] * r["bbox"][3]) for r in results]
    assert sum(m != b for m, b in zip(mask_bins, box_bins)) > len(results) // 3
    ours = coco_evaluate(copy.deepcopy(gt), copy.deepcopy(results))
    for iou_type in ("bbox", "segm"):
        np.testing.assert_allclose(
            list(ours[iou_type].values()), reference_coco(gt, results, iou_type), rtol=0, atol=1e-12
        )
    assert min(ours["segm"][k] for k in ("APs", "APm", "APl")) > 0.05  # every bin means something
    # the box-area binning (pycocotools or faster-coco-eval given the box) gives other size numbers
    boxed = COCO()
    boxed.dataset = copy.deepcopy(gt)
    boxed.createIndex()
    evaluator = COCOeval(boxed, boxed.loadRes(copy.deepcopy(results)), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    by_box = dict(zip(COCO_NAMES.values(), evaluator.stats))
    assert by_box["AP"] == pytest.approx(ours["segm"]["AP"], abs=1e-12)  # only the size bins move
    assert max(abs(by_box[k] - ours["segm"][k]) for k in ("APs", "APm", "APl")) > 0.01


def blob(rng: np.random.Generator, size: int, height: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(height / 2, size - height / 2), rng.uniform(width / 2, size - width / 2)
    return ((yy - cy) / (height / 2)) ** 2 + ((xx - cx) / (width / 2)) ** 2 <= 1


@pytest.fixture(scope="module")
def lvis_set():
    """A federated set: frequencies r/c/f, negatives, non-exhaustive categories, images without ground
    truth; image 10 has neither ground truth nor negatives, so every detection on it is dropped."""
    rng = np.random.default_rng(0)
    size, num_categories = 128, 6
    categories = [{"id": i + 1, "name": f"c{i}", "frequency": f} for i, f in enumerate("rccfff")]
    images, annotations, results = [], [], []

    def detection(image_id, category, mask):
        return {"image_id": image_id, "category_id": category, "bbox": tight_box(mask),
                "score": float(rng.random()), "segmentation": rle(mask)}  # fmt: skip

    for image_id in range(1, 11):
        present = set()
        for _ in range(0 if image_id >= 9 else int(rng.integers(1, 5))):
            side = float(rng.choice([14, 30, 60, 120]))
            mask = blob(rng, size, side * rng.uniform(0.7, 1), side * rng.uniform(0.7, 1))
            category = int(rng.integers(1, num_categories + 1))
            present.add(category)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": tight_box(mask), "area": float(mask.sum()),
                                "segmentation": rle(mask)})  # fmt: skip
            for _ in range(3):
                shifted = np.roll(mask, tuple(rng.integers(-4, 5, 2)), axis=(0, 1))
                label = category if rng.random() < 0.7 else int(rng.integers(1, num_categories + 1))
                results.append(detection(image_id, label, shifted))
        absent = [c for c in range(1, num_categories + 1) if c not in present]
        negatives = [] if image_id == 10 else [c for c in absent if rng.random() < 0.5]
        not_exhaustive = [c for c in present if rng.random() < 0.3]
        images.append({"id": image_id, "height": size, "width": size, "neg_category_ids": negatives,
                       "not_exhaustive_category_ids": not_exhaustive})  # fmt: skip
        for _ in range(4):  # false positives, of categories counted or not on the image
            mask = blob(rng, size, rng.uniform(8, 60), rng.uniform(8, 60))
            results.append(detection(image_id, int(rng.integers(1, num_categories + 1)), mask))
    return {"images": images, "annotations": annotations, "categories": categories}, results


def test_lvis_box_and_mask_ap_equal_lvis_eval(lvis_set, tmp_path, monkeypatch):
    # lvis 0.5.3 calls np.float, an alias of float that NumPy 1.24 removed
    monkeypatch.setattr(np, "float", float, raising=False)
    gt, results = lvis_set
    assert not any(a["image_id"] == 10 for a in gt["annotations"])
    assert gt["images"][9]["neg_category_ids"] == []
    assert any(r["image_id"] == 10 for r in results)  # the image whose detections are all dropped
    ours = coco_evaluate(copy.deepcopy(gt), copy.deepcopy(results), lvis=True, max_per_image=300)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    for iou_type in ("bbox", "segm"):
        detections = copy.deepcopy(results)
        if iou_type == "segm":  # detectron2's LVISEvaluator drops the box of mask results
            for detection in detections:
                detection.pop("bbox")
        ground_truth = lvis.LVIS(str(tmp_path / "gt.json"))
        evaluator = lvis.LVISEval(ground_truth, lvis.LVISResults(ground_truth, detections), iou_type)
        evaluator.run()
        reference = {k.removesuffix("@300"): v for k, v in evaluator.get_results().items()}
        assert set(reference) == set(LVIS_NAMES.values())
        for name, value in ours[iou_type].items():
            assert value == pytest.approx(reference[name], abs=1e-12), (iou_type, name)
        assert 0.1 < ours[iou_type]["AP"] < 0.9 and ours[iou_type]["APr"] > 0


def test_federated_filter_keeps_annotated_and_negative_categories():
    gt = {
        "images": [{"id": 1, "neg_category_ids": [3]}, {"id": 2, "neg_category_ids": []}],
        "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 2, "category_id": 2}],
    }
    results = [{"image_id": i, "category_id": c} for i in (1, 2, 7) for c in (1, 2, 3)]
    kept = [(r["image_id"], r["category_id"]) for r in federated_results(gt, results)]
    assert kept == [(1, 1), (1, 3), (2, 2), (7, 1), (7, 2), (7, 3)]  # image 7 is left for loadRes to refuse


def test_no_detections_score_as_cocoeval_defines_and_no_masks_are_undefined(l_shape_set):
    gt, results = l_shape_set
    gt = copy.deepcopy(gt)  # ground truth in the small and medium bins only: large is undefined
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] <= 96**2]
    empty = coco_evaluate(copy.deepcopy(gt), [])
    for iou_type in ("bbox", "segm"):
        np.testing.assert_allclose(
            list(empty[iou_type].values()), reference_coco(gt, [], iou_type), rtol=0, atol=0
        )
        assert empty[iou_type]["AP"] == 0.0 and empty[iou_type]["APl"] == empty[iou_type]["ARl"] == -1.0
    boxes_only = [{k: v for k, v in r.items() if k != "segmentation"} for r in results]
    stats = coco_evaluate(copy.deepcopy(gt), boxes_only)
    assert stats["segm"] == dict.fromkeys(COCO_NAMES.values(), -1.0)
    np.testing.assert_allclose(
        list(stats["bbox"].values()), reference_coco(gt, boxes_only, "bbox"), rtol=0, atol=1e-12
    )
    lvis_gt = copy.deepcopy(gt)
    for category, frequency in zip(lvis_gt["categories"], "rcf"):
        category["frequency"] = frequency
    for image in lvis_gt["images"]:
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = [], []
    lvis_empty = coco_evaluate(lvis_gt, [], lvis=True, max_per_image=300)
    assert set(lvis_empty["segm"]) == set(LVIS_NAMES.values())
    assert lvis_empty["segm"]["APr"] == 0.0 and lvis_empty["segm"]["APl"] == -1.0
    assert all(math.isfinite(v) for stats in (empty, lvis_empty) for s in stats.values() for v in s.values())
