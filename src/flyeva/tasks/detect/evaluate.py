"""COCO / LVIS box and mask AP with faster-coco-eval (pycocotools' numbers, several times faster).

faster-coco-eval's `maxDets` caps detections per image *and category*; COCO's and LVIS's protocols
cap per image, so results are cut to the top-K per image here first (K = 100 for COCO; LVIS
reports 300, and the release's README numbers use 1000: docs/detect.md). Each rank predicts its
contiguous share of the images; rank 0 gathers the results and evaluates.
"""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from flyeva.data.sources import UnreadableImageError
from flyeva.engine import distributed as D
from flyeva.engine.loop import PRECISIONS, StepContext
from flyeva.tasks.detect.annotations import evaluation_ground_truth
from flyeva.tasks.detect.config import DetectConfig
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.transforms import ResizeLongestSide

logger = logging.getLogger(__name__)

# faster-coco-eval's stats_as_dict names -> COCO's 12 stats (maxDets 1, 10, 100) and LVIS's
COCO_NAMES = {
    "AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
    "AP_large": "APl", "AR_all": "AR1", "AR_second": "AR10", "AR_third": "AR100", "AR_small": "ARs",
    "AR_medium": "ARm", "AR_large": "ARl",
}  # fmt: skip
LVIS_NAMES = {
    "AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
    "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf", "AR_all": "AR", "AR_small": "ARs",
    "AR_medium": "ARm", "AR_large": "ARl",
}  # fmt: skip


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a bool [H, W] mask, with `counts` as str (JSON-ready)."""
    from faster_coco_eval.core import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.decode() if isinstance(counts, bytes) else counts}


def to_coco_results(detection: dict[str, torch.Tensor], image_id: int, category_ids: list[int]) -> list[dict]:
    """One image's detections as COCO result dicts (bbox xywh; segmentation RLE when masks exist)."""
    scores, labels, masks = detection["scores"].tolist(), detection["labels"].tolist(), detection.get("masks")
    results = []
    for slot, (x0, y0, x1, y1) in enumerate(detection["boxes"].detach().cpu().double().tolist()):
        result = {
            "image_id": int(image_id),
            "category_id": category_ids[int(labels[slot])],
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "score": float(scores[slot]),
        }
        if masks is not None:
            result["segmentation"] = encode_mask(masks[slot].cpu().numpy())
        results.append(result)
    return results


def cap_per_image(results: list[dict], max_per_image: int) -> list[dict]:
    """The `max_per_image` highest-scoring results of each image (COCO/LVIS cap per image)."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for result in results:
        by_image[result["image_id"]].append(result)
    capped = []
    for image_results in by_image.values():
        capped += sorted(image_results, key=lambda r: -r["score"])[:max_per_image]
    return capped


def federated_results(ground_truth: dict, results: list[dict]) -> list[dict]:
    """The results LVIS's federated protocol counts: category annotated on the image or in its negatives.

    The others are never scored; dropping them first spares faster-coco-eval 1.8's mask path, which
    fails (`unordered_map::at`) on an image without ground truth whose detections are all dropped.
    Results on images the set lacks are kept, so that loading them still fails loudly.
    """
    images = {image["id"] for image in ground_truth["images"]}
    kept = {(ann["image_id"], ann["category_id"]) for ann in ground_truth["annotations"]}
    kept |= {(image["id"], c) for image in ground_truth["images"] for c in image.get("neg_category_ids", [])}
    return [r for r in results if (r["image_id"], r["category_id"]) in kept or r["image_id"] not in images]


def coco_evaluate(
    ground_truth: str | dict,
    results: list[dict],
    iou_types: tuple[str, ...] = ("bbox", "segm"),
    lvis: bool = False,
    max_per_image: int = 100,
) -> dict[str, dict[str, float]]:
    """{"bbox": {"AP": ..., ...}, "segm": {...}} in [0, 1]; -1 where a stat is undefined (COCO's).

    No detections score 0 where the set has instances and -1 where it has none, as COCOeval defines
    it; mask stats are all -1 when detections exist but none has a mask. Mask results lose their box
    before evaluation (detectron2's COCO and LVIS evaluators), so the mask's area bins them by size.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(ground_truth) if not isinstance(ground_truth, dict) else ground_truth)
    names = LVIS_NAMES if lvis else COCO_NAMES
    results = cap_per_image(results, max_per_image)
    has_masks = not results or any("segmentation" in r for r in results)
    if lvis:  # after the cap, as LVISResults caps before LVISEval filters
        results = federated_results(gt.dataset, results)
    out: dict[str, dict[str, float]] = {}
    for iou_type in iou_types:
        if iou_type == "segm" and not has_masks:
            out[iou_type] = dict.fromkeys(names.values(), -1.0)
            continue
        chosen = results
        if iou_type == "segm":
            chosen = [{k: v for k, v in r.items() if k != "bbox"} for r in results if "segmentation" in r]
        # loadRes rewrites segmentations in place (bytes counts): it gets a copy
        evaluator = COCOeval_faster(
            gt, gt.loadRes(copy.deepcopy(chosen)), iou_type, lvis_style=lvis, print_function=logger.debug
        )
        if lvis:
            evaluator.params.maxDets = [max_per_image]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        out[iou_type] = {names[k]: float(v) for k, v in evaluator.stats_as_dict.items() if k in names}
    return out


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    dataset: CocoDetectionDataset,
    test_size: int,
    batch_size: int = 1,
    max_images: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[dict], int]:
    """This rank's COCO results over `dataset` (longest side -> `test_size`) and its unreadable images."""
    model = D.unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    resize = ResizeLongestSide(test_size)
    count = min(len(dataset), max_images) if max_images else len(dataset)
    share = -(-count // D.world_size())
    indices = list(range(D.rank() * share, min(count, (D.rank() + 1) * share)))
    results, skipped = [], 0
    for start in range(0, len(indices), batch_size):
        images, originals, ids = [], [], []
        for index in indices[start : start + batch_size]:
            try:
                image = dataset.load_image(index)
            except UnreadableImageError as error:
                logger.warning("skipping image %s: %s", dataset.records[index].path, error)
                skipped += 1
                continue
            images.append(resize(image).to(device))
            originals.append((image.height, image.width))
            ids.append(dataset.records[index].image_id)
        if not images:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            detections = model(images, original_sizes=originals)
        for detection, image_id in zip(detections, ids):
            results += to_coco_results(detection, image_id, dataset.category_ids)
    model.train(was_training)
    return results, skipped


class DetectionEvaluator:
    """COCO (or LVIS) box and mask AP of the model on a validation set; rank 0 gets the numbers."""

    def __init__(self, dataset: CocoDetectionDataset, json_path: Path, cfg: DetectConfig):
        self.dataset, self.json_path, self.cfg = dataset, json_path, cfg
        # without what the evaluator cannot score (a NaN polygon would exhaust its memory)
        self.ground_truth = evaluation_ground_truth(json_path)
        self.out = Path(cfg.train.output_dir)
        self.last_results: list[dict] = []
        self.last_stats: dict[str, dict[str, float]] = {}

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        t = self.cfg.test
        base = D.unwrap(model)
        square = base.square_size
        base.square_size = t.size  # test images are padded to the test size, not the training crop
        try:
            results, skipped = predict_dataset(
                model, self.dataset, t.size, t.batch_size, t.max_images, PRECISIONS[self.cfg.train.precision]
            )
        finally:
            base.square_size = square
        results = [r for part in D.all_gather_objects(results) for r in part]  # every rank's, on every rank
        skipped = sum(D.all_gather_objects(skipped))
        evaluated = min(len(self.dataset), t.max_images or len(self.dataset))
        if evaluated and skipped >= evaluated:  # metrics of no image would read as a model scoring 0
            raise ValueError(
                f"none of the {evaluated} validation images of {self.json_path} could be read; check "
                "data.val_images (the warnings above name the files)"
            )
        if not D.is_main():
            return {}
        truth = self.ground_truth
        # a detector without a mask branch (or a box-only set) is scored on boxes only: no segm numbers
        segm = base.roi_heads.mask_head is not None and any("segmentation" in a for a in truth["annotations"])
        kinds = ("bbox", "segm") if segm else ("bbox",)
        stats = coco_evaluate(truth, results, kinds, lvis=t.lvis, max_per_image=t.detections_per_image)
        for cap in t.extra_caps:
            extra = coco_evaluate(truth, results, kinds, lvis=t.lvis, max_per_image=cap)
            stats.update({f"{kind}@{cap}": values for kind, values in extra.items()})
        self.last_results, self.last_stats = results, stats
        if skipped:
            logger.warning("%d unreadable validation images skipped", skipped)
        return stats

    def __call__(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        """The flat metric names the engine logs: {"bbox": {"AP": ..}} -> {"bbox_AP": ..}."""
        stats = self.evaluate(model)
        return {f"{kind}_{name}": value for kind, values in stats.items() for name, value in values.items()}

    def details(self) -> dict[str, Any]:
        """The last evaluation's COCO results go to OUTPUT/detections.json (written by rank 0)."""
        if not self.last_results and not self.last_stats:
            return {}
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "detections.json").write_text(json.dumps(self.last_results))
        return {
            "detections": str(self.out / "detections.json"),
            "detections_per_image": self.cfg.test.detections_per_image,
        }
