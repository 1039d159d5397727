"""Semantic-segmentation inference and metrics, as mmseg computes them.

Inference: the image resized (keep ratio) to the test scale times each ratio, run whole (padded to
the size divisor) or by sliding windows (overlaps averaged), optionally flipped too; the outputs,
resized back and turned into probabilities, are averaged over scales and flips.

Metrics: one confusion matrix over the dataset (ignore 255); mIoU and mAcc average the classes that
occur in the labels or the predictions (mmseg's nanmean), aAcc = all TP / all labelled pixels. This
is torchmetrics' MulticlassJaccardIndex(average='macro', ignore_index=255), not its per-image MeanIoU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flyeva.data.sources import UnreadableImageError, UnreadableTargetError
from flyeva.engine import distributed as D
from flyeva.tasks.segment.transforms import IGNORE_INDEX, normalize, rescale_size

MODES = ("whole", "slide")


@dataclass
class EvalSection:
    """Test-time settings; defaults are the release's EVA-g (slide 896 / 512, single scale)."""

    mode: str = "slide"  # slide | whole
    crop_size: int = 0  # slide window; 0 = aug.crop_size
    stride: int = 512
    scale: list[int] = field(default_factory=list)  # (long, short) test scale; [] = aug.scale
    ratios: list[float] = field(default_factory=lambda: [1.0])  # multi-scale: [0.5, 0.75, ..., 1.75]
    flip: bool = False
    window_batch: int = 4  # sliding windows per forward pass
    max_images: int = 0  # 0 = the whole validation set


def check_eval_section(cfg: EvalSection) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"eval.mode={cfg.mode!r} is not one of {list(MODES)}")
    if cfg.mode == "slide" and not 0 < cfg.stride <= (cfg.crop_size or cfg.stride):
        raise ValueError(f"eval.stride must be in (0, crop size], got {cfg.stride}")
    if not cfg.ratios or min(cfg.ratios) <= 0:
        raise ValueError(f"eval.ratios must be positive scale ratios, got {cfg.ratios}")


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C + 1, C + 1] int64 counts, rows = label class, columns = predicted class; label 255 is skipped.

    Row and column C count labels and predictions outside [0, C) (a prediction of 255 included):
    mmseg's `intersect_and_union` histograms drop them, so such a prediction on a labelled pixel is a
    missed pixel of the label's class, and such a label adds only to the prediction's area.
    """
    keep = target != IGNORE_INDEX
    labels, preds = target[keep].long(), pred[keep].long()
    labels = torch.where((labels >= 0) & (labels < num_classes), labels, num_classes)
    preds = torch.where((preds >= 0) & (preds < num_classes), preds, num_classes)
    size = num_classes + 1
    return torch.bincount(labels * size + preds, minlength=size**2).reshape(size, size)


def segmentation_metrics(confusion: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU / accuracy (None where undefined) from `confusion_matrix`'s
    [C + 1, C + 1] (or a plain [C, C]): as mmseg, a class's labelled area counts every prediction, its
    predicted area every label, inside [0, C) or not."""
    num_classes = len(classes)
    confusion = confusion.double()
    true_positive = confusion[:num_classes, :num_classes].diag()
    labelled = confusion[:num_classes].sum(1)
    predicted = confusion[:, :num_classes].sum(0)
    union = labelled + predicted - true_positive
    iou = true_positive / union  # NaN where a class is neither labelled nor predicted
    accuracy = true_positive / labelled  # NaN where a class is never labelled
    total = float(labelled.sum())

    def listed(values: torch.Tensor) -> dict[str, float | None]:
        return {name: None if math.isnan(v) else v for name, v in zip(classes, values.tolist())}

    return {
        "mIoU": float(iou.nanmean()) if total else 0.0,
        "mAcc": float(accuracy.nanmean()) if total else 0.0,
        "aAcc": float(true_positive.sum()) / total if total else 0.0,
        "per_class_iou": listed(iou),
        "per_class_acc": listed(accuracy),
        "pixels": int(total),
    }


def slide_windows(height: int, width: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's windows (top, left, bottom, right): a grid of stride steps, the last window shifted
    back inside the image; an image smaller than the crop is one window."""
    rows = max(height - crop + stride - 1, 0) // stride + 1
    cols = max(width - crop + stride - 1, 0) // stride + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            bottom, right = min(row * stride + crop, height), min(col * stride + crop, width)
            boxes.append((max(bottom - crop, 0), max(right - crop, 0), bottom, right))
    return boxes


def _pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.pad(images, (0, width - images.shape[-1], 0, height - images.shape[-2]))


def whole_inference(model: nn.Module, images: torch.Tensor, size_divisor: int) -> torch.Tensor:
    """Outputs for whole images, padded (zeros, after normalisation) to the divisor and cut back."""
    height, width = images.shape[-2:]
    padded = [math.ceil(side / size_divisor) * size_divisor for side in (height, width)]
    return model(_pad_to(images, *padded))[..., :height, :width].float()


def slide_inference(
    model: nn.Module, images: torch.Tensor, num_classes: int, crop: int, stride: int, window_batch: int = 1
) -> torch.Tensor:
    """Average of the model's outputs over overlapping windows; windows smaller than the crop
    (image smaller than the crop) are padded to it, as the model was trained on padded crops."""
    batch, _, height, width = images.shape
    summed = images.new_zeros(batch, num_classes, height, width, dtype=torch.float32)
    counts = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    boxes = slide_windows(height, width, crop, stride)
    for first in range(0, len(boxes), window_batch):
        chunk = boxes[first : first + window_batch]
        windows = torch.cat([_pad_to(images[..., t:b, x:r], crop, crop) for t, x, b, r in chunk])
        outputs = model(windows).float().split(batch)
        for (top, left, bottom, right), output in zip(chunk, outputs):
            summed[..., top:bottom, left:right] += output[..., : bottom - top, : right - left]
            counts[..., top:bottom, left:right] += 1
    return summed / counts


def predict_probabilities(
    model: nn.Module,
    image: torch.Tensor,
    num_classes: int,
    cfg: EvalSection,
    size_divisor: int,
    outputs_are_probabilities: bool = False,
) -> torch.Tensor:
    """Class probabilities [1, C, H, W] at the image's own size, averaged over cfg.ratios and flips
    (`cfg.scale` and `cfg.crop_size` resolved); logits go through softmax first."""
    height, width = image.shape[-2:]
    total = image.new_zeros(1, num_classes, height, width, dtype=torch.float32)
    for ratio in cfg.ratios:
        size = rescale_size(width, height, cfg.scale[0] * ratio, cfg.scale[1] * ratio)
        scaled = F.interpolate(image, size=(size[1], size[0]), mode="bilinear", align_corners=False)
        for flip in (False, True) if cfg.flip else (False,):
            inputs = scaled.flip(-1) if flip else scaled
            if cfg.mode == "slide":
                outputs = slide_inference(
                    model, inputs, num_classes, cfg.crop_size, cfg.stride, cfg.window_batch
                )
            else:
                outputs = whole_inference(model, inputs, size_divisor)
            outputs = outputs.flip(-1) if flip else outputs
            outputs = F.interpolate(outputs, size=(height, width), mode="bilinear", align_corners=False)
            total += outputs if outputs_are_probabilities else outputs.softmax(1)
    return total / (len(cfg.ratios) * (2 if cfg.flip else 1))


class Evaluator:
    """Dataset-level metrics of a segmenter on validation pairs: each rank takes every world_size-th image
    and the confusion matrices are summed; with `shard=False` (FSDP, whose forward is collective) every
    rank runs every image and counts once."""

    def __init__(
        self, pairs: Any, cfg: EvalSection, rank: int = 0, world_size: int = 1, shard: bool = True
    ) -> None:
        self.pairs, self.cfg, self.rank, self.world_size, self.shard = pairs, cfg, rank, world_size, shard
        self.num_classes = len(pairs.classes)
        self.last: dict[str, Any] = {}

    def _indices(self) -> range:
        count = len(self.pairs) if not self.cfg.max_images else min(self.cfg.max_images, len(self.pairs))
        return range(self.rank, count, self.world_size) if self.shard else range(count)

    @torch.no_grad()
    def run(self, model: nn.Module, device: torch.device) -> dict[str, Any]:
        """Full metrics (per class too) and the skipped files; also kept in `self.last`."""
        base = D.unwrap(model)
        probabilities = getattr(base, "scores_are_probabilities", False)
        divisor = base.backbone.size_divisor
        confusion = torch.zeros(self.num_classes + 1, self.num_classes + 1, dtype=torch.int64)
        skipped: list[str] = []
        was_training = model.training
        model.eval()
        for index in self._indices():
            try:
                image, label = self.pairs.load_pair(index)
            except (UnreadableImageError, UnreadableTargetError) as error:
                skipped.append(f"{self.pairs.key(index)}: {error}")
                continue
            pixels = normalize(image)[None].to(device)
            scores = predict_probabilities(model, pixels, self.num_classes, self.cfg, divisor, probabilities)
            prediction = scores.argmax(1)[0].cpu()
            confusion += confusion_matrix(prediction, torch.from_numpy(label).long(), self.num_classes)
        model.train(was_training)
        if self.shard:
            confusion = D.all_reduce_sum(confusion.to(device)).cpu()
            skipped = [item for part in D.all_gather_objects(skipped) for item in part]
        if skipped and int(confusion.sum()) == 0:  # no pair could be read: metrics of nothing
            raise ValueError(
                f"none of the {len(skipped)} validation pairs could be read (first: {skipped[0]}); fix "
                "the validation data (data.*) or its path"
            )
        self.last = segmentation_metrics(confusion, self.pairs.classes) | {"skipped": skipped}
        return self.last

    def details(self) -> dict[str, Any]:
        """Per-class IoU and accuracy, and the skipped files, of the last evaluation."""
        return {k: v for k, v in self.last.items() if k not in ("mIoU", "mAcc", "aAcc")}

    def __call__(self, model: nn.Module, ctx: Any) -> dict[str, float]:
        metrics = self.run(model, ctx.device)
        return {key: metrics[key] for key in ("mIoU", "mAcc", "aAcc")}
