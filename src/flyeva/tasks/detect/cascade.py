"""Cascade R-CNN box stages and the Mask R-CNN mask head on torchvision's parts.

Release `EVA-01/det` (detectron2 `CascadeROIHeads`): 512 RoIs per image (25% foreground) sampled
once, ground truth appended to the proposals; three stages matched at IoU 0.5/0.6/0.7 with box
weights (10,10,5,5)/(20,20,10,10)/(30,30,15,15), class-agnostic regression, each stage's
features scaled by 1/3 in the backward pass; at test the class scores are averaged over stages
and the last stage's boxes are kept. Background is the last class index (detectron2's layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import box_iou, clip_boxes_to_image, roi_align

from flyeva.tasks.detect.lvis import sigmoid_ce_loss
from flyeva.tasks.detect.pooler import AlignedMultiScaleRoIAlign

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))
layer_norm_2d = partial(LayerNorm2d, eps=1e-6)  # detectron2 "LN" over channels (ViTDet heads)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class BoxPredictor(nn.Module):
    """cls_score (K + 1, background last) and class-agnostic bbox_pred (4), detectron2's names."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)  # detectron2 FastRCNNOutputLayers init
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


@dataclass
class RoIHeadsConfig:
    """What the cascade and mask heads need; defaults are the release's COCO model."""

    num_classes: int = 80
    strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # pooled levels (no P6)
    channels: int = 256
    conv_dims: list[int] = field(default_factory=lambda: [256] * 4)  # 4conv1fc, LN
    fc_dims: list[int] = field(default_factory=lambda: [1024])
    mask_dims: list[int] = field(default_factory=lambda: [256] * 4)  # empty = no mask head
    batch_size_per_image: int = 512
    positive_fraction: float = 0.25
    stage_ious: list[float] = field(default_factory=lambda: list(STAGE_IOUS))
    classifier: str = "softmax"  # softmax | sigmoid_fed (LVIS)
    fed_loss_classes: int = 50
    score_threshold: float = 0.05
    nms: str = "hard"  # hard | soft
    nms_threshold: float = 0.5
    soft_min_score: float = 1e-3
    detections_per_image: int = 100
    maskness: bool = False


class CascadeRoIHeads(nn.Module):
    """Three box stages (`box_head.k`, `box_predictor.k`) and a mask head, trained and run end to end."""

    def __init__(self, cfg: RoIHeadsConfig, fed_weights: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        stages = len(cfg.stage_ious)
        self.box_pooler = AlignedMultiScaleRoIAlign(cfg.strides, 7)
        self.box_head = nn.ModuleList(
            FastRCNNConvFCHead((cfg.channels, 7, 7), cfg.conv_dims, cfg.fc_dims, norm_layer=layer_norm_2d)
            for _ in range(stages)
        )
        self.box_predictor = nn.ModuleList(
            BoxPredictor(cfg.fc_dims[-1], cfg.num_classes) for _ in range(stages)
        )
        self.box_coders = [det_utils.BoxCoder(STAGE_WEIGHTS[k]) for k in range(stages)]
        self.matchers = [
            det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in cfg.stage_ious
        ]
        self.sampler = det_utils.BalancedPositiveNegativeSampler(
            cfg.batch_size_per_image, cfg.positive_fraction
        )
        self.mask_pooler = AlignedMultiScaleRoIAlign(cfg.strides, 14)
        self.mask_head = self.mask_predictor = None
        if cfg.mask_dims:
            self.mask_head = MaskRCNNHeads(cfg.channels, cfg.mask_dims, 1, norm_layer=layer_norm_2d)
            self.mask_predictor = MaskRCNNPredictor(cfg.mask_dims[-1], cfg.mask_dims[-1], cfg.num_classes)
        self.register_buffer(
            "fed_weights", fed_weights if fed_weights is not None else torch.zeros(0), persistent=False
        )

    def match(self, proposals: list[torch.Tensor], targets: list[dict], stage: int) -> tuple[list, list]:
        """Per image: class of each proposal (background = K) and its matched ground-truth index."""
        classes, matched = [], []
        for boxes, target in zip(proposals, targets):
            if len(target["boxes"]) == 0:
                classes.append(torch.full((len(boxes),), self.cfg.num_classes, device=boxes.device))
                matched.append(torch.zeros(len(boxes), dtype=torch.long, device=boxes.device))
                continue
            index = self.matchers[stage](box_iou(target["boxes"], boxes))
            label = target["labels"][index.clamp(min=0)].clone()
            label[index < 0] = self.cfg.num_classes
            classes.append(label)
            matched.append(index.clamp(min=0))
        return classes, matched

    def sample(self, proposals: list[torch.Tensor], targets: list[dict]) -> list[torch.Tensor]:
        """Ground truth appended, then 512 per image at 25% foreground, matched at the first stage's IoU."""
        proposals = [torch.cat([p.detach(), t["boxes"]]) for p, t in zip(proposals, targets)]
        classes, _ = self.match(proposals, targets, 0)
        # torchvision's sampler wants 1 = foreground, 0 = background, -1 = ignore
        binary = [(c != self.cfg.num_classes).long() for c in classes]
        positive, negative = self.sampler(binary)
        return [p[(pos | neg).bool()] for p, pos, neg in zip(proposals, positive, negative)]

    def run_stage(self, features: list[torch.Tensor], boxes: list[torch.Tensor], stage: int):
        pooled = self.box_pooler(features, boxes)
        if self.training:  # each stage contributes 1/3 of the backbone's gradient (Cascade R-CNN)
            pooled = _ScaleGradient.apply(pooled, 1.0 / len(self.box_head))
        return self.box_predictor[stage](self.box_head[stage](pooled))

    def stage_loss(self, logits, deltas, boxes, targets, stage: int) -> dict[str, torch.Tensor]:
        classes, matched = self.match(boxes, targets, stage)
        gt_classes = torch.cat(classes)
        if self.cfg.classifier == "sigmoid_fed":
            weights = self.fed_weights if len(self.fed_weights) else None
            loss_cls = sigmoid_ce_loss(logits, gt_classes, weights, self.cfg.fed_loss_classes)
        else:
            loss_cls = F.cross_entropy(logits, gt_classes) if len(gt_classes) else logits.sum() * 0
        fg = gt_classes < self.cfg.num_classes
        gt_boxes = torch.cat(
            [t["boxes"][m] if len(t["boxes"]) else b for t, m, b in zip(targets, matched, boxes)]
        )
        regression = self.box_coders[stage].encode_single(gt_boxes[fg], torch.cat(boxes)[fg])
        # detectron2 with smooth_l1_beta 0: L1 summed over foreground, divided by all sampled RoIs
        loss_box = F.l1_loss(deltas[fg], regression, reduction="sum") / max(1, len(gt_classes))
        return {f"loss_cls_stage{stage}": loss_cls, f"loss_box_stage{stage}": loss_box}

    def next_boxes(
        self, deltas: torch.Tensor, boxes: list[torch.Tensor], sizes, stage: int
    ) -> list[torch.Tensor]:
        decoded = self.box_coders[stage].decode_single(deltas.detach(), torch.cat(boxes))
        parts = decoded.split([len(b) for b in boxes])
        out = [clip_boxes_to_image(p, size) for p, size in zip(parts, sizes)]
        if self.training:  # detectron2 drops boxes that became empty
            out = [b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])] for b in out]
        return out

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.sigmoid() if self.cfg.classifier == "sigmoid_fed" else logits.softmax(-1)
        return probs[:, : self.cfg.num_classes]

    def mask_logits(self, features: list[torch.Tensor], boxes: list[torch.Tensor]) -> torch.Tensor:
        return self.mask_predictor(self.mask_head(self.mask_pooler(features, boxes)))

    def mask_loss(self, features, proposals, targets) -> torch.Tensor:
        """BCE of each foreground RoI's own-class 28x28 mask against its ground truth, pooled aligned."""
        classes, matched = self.match(proposals, targets, 0)
        fg_boxes, fg_classes, mask_targets = [], [], []
        for boxes, cls, index, target in zip(proposals, classes, matched, targets):
            fg = cls < self.cfg.num_classes
            fg_boxes.append(boxes[fg])
            fg_classes.append(cls[fg])
            if fg.any():
                rois = torch.cat([index[fg, None].to(boxes.dtype), boxes[fg]], dim=1)
                gt = target["masks"][:, None].to(boxes.dtype)
                mask_targets.append(roi_align(gt, rois, (28, 28), 1.0, 0, aligned=True)[:, 0])
        if not mask_targets:
            # no foreground RoI: a zero that still reaches every mask parameter (DDP expects gradients)
            params = [*self.mask_head.parameters(), *self.mask_predictor.parameters()]
            return sum(p.sum() for p in params) * 0.0
        logits = self.mask_logits(features, fg_boxes)
        cls = torch.cat(fg_classes)
        chosen = logits[torch.arange(len(cls), device=cls.device), cls]
        return F.binary_cross_entropy_with_logits(chosen, (torch.cat(mask_targets) >= 0.5).to(chosen.dtype))

    def stages(self, features, boxes: list[torch.Tensor], image_sizes) -> Iterator[tuple]:
        """(stage, boxes, logits, deltas) of each stage, on the boxes the stage before refined."""
        deltas = None
        for stage in range(len(self.box_head)):
            if deltas is not None:
                boxes = self.next_boxes(deltas, boxes, image_sizes, stage - 1)
            logits, deltas = self.run_stage(features, boxes, stage)
            yield stage, boxes, logits, deltas

    def forward(self, features, proposals, image_sizes, targets=None):
        """Training: a loss dict. Test: per image {boxes, scores, labels[, mask_probs 28x28]}."""
        if self.training:
            sampled, losses = self.sample(proposals, targets), {}
            for stage, boxes, logits, deltas in self.stages(features, sampled, image_sizes):
                losses.update(self.stage_loss(logits, deltas, boxes, targets, stage))
            if self.mask_head is not None:
                losses["loss_mask"] = self.mask_loss(features, sampled, targets)
            return losses
        runs = list(self.stages(features, proposals, image_sizes))
        stage, boxes, _, deltas = runs[-1]
        probs = torch.stack([self.class_probs(logits) for _, _, logits, _ in runs]).mean(0)
        final_boxes = self.next_boxes(deltas, boxes, image_sizes, stage)
        return self.select(features, final_boxes, probs.split([len(b) for b in boxes]))

    def select(self, features, boxes, probs) -> list[dict[str, torch.Tensor]]:
        from flyeva.tasks.detect.postprocess import calibrate_scores, per_class_detections

        cfg, results = self.cfg, []
        args = (cfg.score_threshold, cfg.nms_threshold, cfg.detections_per_image, cfg.nms, cfg.soft_min_score)
        for image_boxes, image_probs in zip(boxes, probs):
            kept_boxes, scores, labels = per_class_detections(image_boxes, image_probs, *args)
            results.append({"boxes": kept_boxes, "scores": scores, "labels": labels})
        if self.mask_head is None:
            return results
        logits = self.mask_logits(features, [r["boxes"] for r in results])
        for result, image_logits in zip(results, logits.split([len(r["boxes"]) for r in results])):
            index = torch.arange(len(image_logits), device=image_logits.device)
            result["mask_probs"] = image_logits[index, result["labels"]].sigmoid()
            if cfg.maskness and len(index):
                scores, order = calibrate_scores(
                    result["scores"], result["mask_probs"], cfg.detections_per_image
                )
                result.update({k: v[order] for k, v in result.items()}, scores=scores)
        return results
