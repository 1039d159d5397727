"""Detection data and evaluation: COCO reading and repairs, LSJ, the resumable stream, AP parity."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from flyeva.data.export import encode_rle, export_split
from flyeva.data.synthetic import ShapeWorld
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.evaluate import cap_per_image, coco_evaluate, encode_mask
from flyeva.tasks.detect.stream import DetectionBatchStream
from flyeva.tasks.detect.transforms import LargeScaleJitter, boxes_from_masks

torch.set_num_threads(1)


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(ann_id, image_id, category_id, bbox, segmentation, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "segmentation": segmentation, "iscrowd": iscrowd}  # fmt: skip


@pytest.fixture
def coco_folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "val2017").mkdir()
    for name in ("a.png", "b.png", "val2017/c.png"):
        Image.new("RGB", (40, 30), (200, 10, 10)).save(images / name)
    (images / "broken.png").write_bytes(b"not a png at all")
    rle_mask = np.zeros((30, 40), dtype=bool)
    rle_mask[5:15, 20:30] = True
    document = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 30, "width": 40},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 40},
            # LVIS v1 has no file_name: the path is the end of coco_url
            {"id": 3, "coco_url": "http://images.cocodataset.org/val2017/c.png", "height": 30, "width": 40},
            {"id": 4, "file_name": "broken.png", "height": 30, "width": 40},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
        "annotations": [
            ann(1, 1, 7, [2, 2, 8, 8], square(2, 2, 10, 10)),
            ann(2, 1, 3, [20, 5, 10, 10], encode_rle(rle_mask)),
            ann(3, 1, 3, [0, 0, 40, 30], encode_rle(np.ones((30, 40), dtype=bool)), iscrowd=1),
            ann(4, 2, 3, [35, 20, 10, 20], square(35, 20, 40, 30)),  # outside the image: clipped
            ann(5, 2, 3, [5, 5, 0, 4], square(5, 5, 6, 9)),  # zero width
            ann(6, 2, 99, [5, 5, 4, 4], square(5, 5, 9, 9)),  # unknown category
            ann(7, 3, 7, [5, 5, 4, 4], [[5, 5, 9, 5, 9]]),  # odd-length polygon
            ann(8, 3, 7, [1, 1, 4, 4], square(1, 1, 5, 5)),
        ],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(document))
    return tmp_path


def test_reader_repairs_and_drops_bad_annotations_and_counts_them(coco_folder):
    dataset = CocoDetectionDataset(coco_folder / "instances.json")
    assert dataset.category_ids == [3, 7] and dataset.class_names == ["three", "seven"]
    assert dict(dataset.problems) == {
        "box outside the image (clipped)": 1,  # id 4
        "zero-area box": 1,  # id 5
        "unknown category id": 1,  # id 6
        "malformed polygon": 1,  # id 7
    }
    assert [len(r.instances) for r in dataset.records] == [2, 1, 1, 0]  # the crowd region is not trained on
    assert dataset.records[1].instances[0].box == (35.0, 20.0, 40.0, 30.0)
    assert dataset.records[2].path == coco_folder / "images" / "val2017" / "c.png"
    masks = dataset.masks(0)
    assert masks.shape == (2, 30, 40)
    assert masks[0].sum() == 64 and masks[1].sum() == 100  # polygon 8x8, RLE 10x10
    assert masks[1][5:15, 20:30].all()
    assert dataset.image_counts == [2, 2]


def test_lsj_flip_without_scaling_recomputes_boxes_from_masks():
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:6, 1:4] = True
    masks[1, 10:12, 15:20] = True
    transform = LargeScaleJitter(20, min_scale=1.0, max_scale=1.0, flip=1.0)
    sample = transform(Image.new("RGB", (20, 20)), masks, np.array([0, 1]))
    assert sample.image.shape == (3, 20, 20)
    torch.testing.assert_close(sample.boxes, torch.tensor([[16.0, 2, 19, 6], [0, 10, 5, 12]]))


def test_lsj_crop_drops_emptied_instances():
    torch.manual_seed(0)
    masks = np.zeros((2, 40, 40), dtype=bool)
    masks[0, 0:4, 0:4] = True  # top-left corner
    masks[1, 36:40, 36:40] = True  # bottom-right corner
    transform = LargeScaleJitter(20, min_scale=1.0, max_scale=1.0, flip=0.0)  # 40 px -> 20 px: no crop
    sample = transform(Image.new("RGB", (40, 40)), masks, np.array([0, 1]))
    assert len(sample.boxes) == 2 and sample.image.shape == (3, 20, 20)
    transform = LargeScaleJitter(20, min_scale=2.0, max_scale=2.0, flip=0.0)  # 40 px stays 40: crop 20 of 40
    kept = [len(transform(Image.new("RGB", (40, 40)), masks, np.array([0, 1])).boxes) for _ in range(20)]
    assert set(kept) <= {0, 1} and 1 in kept  # a 20 px crop never holds both corners
    assert boxes_from_masks(torch.zeros(1, 5, 5, dtype=torch.bool)).tolist() == [[0, 0, 0, 0]]


def _batches(stream, epoch, skip=()):
    stream.set_epoch(epoch, skip)
    return list(DataLoader(stream, batch_size=None, num_workers=0))


def test_stream_skips_corrupt_images_and_resumes_exactly(coco_folder):
    dataset = CocoDetectionDataset(coco_folder / "instances.json")
    stream = DetectionBatchStream(dataset, LargeScaleJitter(32), batch_size=2, seed=3)
    assert stream.num_batches() == 2
    full = _batches(stream, 1)
    assert sum(b["num_skipped"] for b in full) == 1  # broken.png
    assert sorted(i for b in full for i in b["image_ids"].tolist()) == [1, 2, 3]
    assert full[0]["images"].shape[1:] == (3, 32, 32) and full[0]["images"].dtype == torch.uint8
    resumed = _batches(stream, 1, skip=[1])
    assert len(resumed) == 1 and resumed[0]["index"] == 1
    torch.testing.assert_close(resumed[0]["images"], full[1]["images"])
    for a, b in zip(resumed[0]["targets"], full[1]["targets"]):
        torch.testing.assert_close(a["boxes"], b["boxes"])
    assert not torch.equal(_batches(stream, 2)[0]["images"], full[0]["images"])  # a new epoch, new crops


def test_repeat_factor_stream_keeps_a_fixed_epoch_length(coco_folder):
    dataset = CocoDetectionDataset(coco_folder / "instances.json")
    factors = np.array([1.0, 2.5, 1.0, 1.0])
    stream = DetectionBatchStream(dataset, LargeScaleJitter(32), batch_size=1, repeat_factors=factors)
    assert stream.epoch_length() == 6 and stream.num_batches() == 6
    for epoch in range(5):
        stream.set_epoch(epoch)
        order = stream.epoch_order()
        assert len(order) == 6 and (order == 1).sum() >= 2  # image 1 appears at least floor(2.5) times


def perfect_results(gt: dict, with_masks: bool) -> list[dict]:
    results = []
    for ann in gt["annotations"]:
        result = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"],
            "bbox": ann["bbox"],
            "score": 0.9,
        }
        if with_masks:
            result["segmentation"] = ann["segmentation"]
        results.append(result)
    return results


@pytest.fixture(scope="module")
def shapeworld_gt(tmp_path_factory):
    out = export_split(
        ShapeWorld(image_size=48, seed=5), tmp_path_factory.mktemp("sw"), 12, formats=("coco",)
    )
    return json.loads(out["coco"].read_text())


def test_perfect_predictions_score_ap_one_coco_and_lvis(shapeworld_gt):
    gt = copy.deepcopy(shapeworld_gt)
    stats = coco_evaluate(gt, perfect_results(gt, True))
    assert stats["bbox"]["AP"] == pytest.approx(1.0) and stats["segm"]["AP"] == pytest.approx(1.0)
    assert set(stats["bbox"]) == {
        "AP",
        "AP50",
        "AP75",
        "APs",
        "APm",
        "APl",
        "AR1",
        "AR10",
        "AR100",
        "ARs",
        "ARm",
        "ARl",
    }
    frequencies = ["r", "c", "f", "f", "c"]
    for category, frequency in zip(gt["categories"], frequencies):
        category["frequency"] = frequency
    for image in gt["images"]:
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = [], []
    lvis = coco_evaluate(gt, perfect_results(gt, True), lvis=True, max_per_image=300)
    assert lvis["bbox"]["AP"] == pytest.approx(1.0) and lvis["segm"]["APf"] == pytest.approx(1.0)
    assert {"APr", "APc", "APf"} <= set(lvis["segm"])


def test_faster_coco_eval_equals_pycocotools_on_a_random_set(shapeworld_gt):
    from faster_coco_eval.core import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(0)
    gt = copy.deepcopy(shapeworld_gt)
    results = []
    for ann in gt["annotations"]:
        gt_mask = mask_util.decode(ann["segmentation"]).astype(bool)
        for _ in range(3):  # jittered boxes, shifted masks, random categories and scores
            x, y, w, h = (np.array(ann["bbox"]) + rng.normal(0, 2, 4)).tolist()
            w, h = max(w, 1.0), max(h, 1.0)
            mask = np.roll(gt_mask, tuple(rng.integers(-2, 3, 2)), axis=(0, 1))
            category = ann["category_id"] if rng.random() < 0.7 else int(rng.integers(1, 6))
            results.append({"image_id": ann["image_id"], "category_id": category, "bbox": [x, y, w, h],
                            "score": float(rng.random()), "segmentation": encode_mask(mask)})  # fmt: skip
    ours = coco_evaluate(gt, results)
    reference_gt = COCO()
    reference_gt.dataset = copy.deepcopy(gt)
    reference_gt.createIndex()
    for iou_type in ("bbox", "segm"):
        chosen = copy.deepcopy(results)
        if iou_type == "segm":  # mask results are scored without their box (detectron2's evaluators)
            chosen = [{k: v for k, v in r.items() if k != "bbox"} for r in chosen]
        evaluator = COCOeval(reference_gt, reference_gt.loadRes(chosen), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        np.testing.assert_allclose(list(ours[iou_type].values()), evaluator.stats, atol=1e-12)
        assert 0.05 < ours[iou_type]["AP"] < 0.95  # a set where the numbers mean something


def test_cap_per_image_keeps_the_top_scores():
    results = [{"image_id": i % 2, "score": s / 10} for i, s in enumerate(range(10))]
    capped = cap_per_image(results, 2)
    assert sorted((r["image_id"], r["score"]) for r in capped) == [(0, 0.6), (0, 0.8), (1, 0.7), (1, 0.9)]
