"""Test-time detection post-processing: per-class NMS or Soft-NMS, mask-score calibration, caps.

Release `EVA-01/det` on COCO: Soft-NMS (linear, IoU 0.6, min score 1e-3), then the box score is
multiplied by the mean mask probability above 0.5 ("maskness"). Two release quirks are fixed
here (docs/detect.md): its maskness re-sort assigns to a loop variable and has no effect, so
detections stay in box-score order; and its Soft-NMS path skips the per-image top-k cap.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_iou

SOFT_NMS_METHODS = ("linear", "hard")


def soft_nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float = 0.6,
    min_score: float = 1e-3,
    method: str = "linear",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS of one class (Bodla et al. 2017, the release's loop): indices kept and their new scores.

    Repeatedly keep the top box and decay the others' scores where IoU > threshold: linear x (1 - IoU),
    hard x 0 (= plain NMS); drop scores <= min_score.
    """
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method {method!r} is not one of {SOFT_NMS_METHODS}")
    indices = torch.arange(len(boxes), device=boxes.device)
    kept, kept_scores = [], []
    while len(scores):
        top = int(torch.argmax(scores))
        kept.append(indices[top])
        kept_scores.append(scores[top])
        ious = box_iou(boxes[top : top + 1], boxes)[0]
        if method == "linear":
            scores = scores * torch.where(ious > iou_threshold, 1 - ious, torch.ones_like(ious))
        else:
            scores = scores * (ious <= iou_threshold).to(scores.dtype)
        remain = scores > min_score
        remain[top] = False
        boxes, scores, indices = boxes[remain], scores[remain], indices[remain]
    if not kept:
        return indices, scores
    return torch.stack(kept), torch.stack(kept_scores)


def batched_soft_nms(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-NMS within each label; indices sorted by decayed score, and those scores."""
    kept, kept_scores = [], []
    for label in labels.unique():
        members = torch.nonzero(labels == label).squeeze(1)
        keep, new_scores = soft_nms(boxes[members], scores[members], **kwargs)
        kept.append(members[keep])
        kept_scores.append(new_scores)
    if not kept:
        return labels.new_zeros(0), scores.new_zeros(0)
    kept_t, scores_t = torch.cat(kept), torch.cat(kept_scores)
    order = torch.argsort(scores_t, descending=True)
    return kept_t[order], scores_t[order]


def per_class_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    score_threshold: float,
    nms_threshold: float,
    topk: int,
    nms: str = "hard",
    soft_min_score: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """detectron2's `fast_rcnn_inference_single_image` for class-agnostic boxes [N, 4], scores [N, K]: boxes,
    scores and labels (0..K-1) of at most `topk` detections (after Soft-NMS too), by descending score."""
    candidates = torch.nonzero(scores > score_threshold)
    rows, labels = candidates[:, 0], candidates[:, 1]
    cand_boxes, cand_scores = boxes[rows], scores[rows, labels]
    if nms == "soft":
        keep, cand_scores = batched_soft_nms(
            cand_boxes, cand_scores, labels, iou_threshold=nms_threshold, min_score=soft_min_score
        )
    elif nms == "hard":
        keep = batched_nms(cand_boxes, cand_scores, labels, nms_threshold)
        cand_scores = cand_scores[keep]
    else:
        raise ValueError(f"nms must be 'hard' or 'soft', got {nms!r}")
    keep = keep[:topk]
    return cand_boxes[keep], cand_scores[:topk], labels[keep]


def maskness(mask_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean mask probability over pixels above `threshold`, per mask [N, ...] -> [N] (0 if none)."""
    flat = mask_probs.flatten(1)
    above = (flat > threshold).to(flat.dtype)
    return (flat * above).sum(1) / (above.sum(1) + 1e-6)  # the release's 1e-6 guard


def calibrate_scores(
    scores: torch.Tensor, mask_probs: torch.Tensor, topk: int, threshold: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box score x maskness, re-sorted for real, capped at `topk`: (new scores, the order to apply)."""
    calibrated = scores * maskness(mask_probs, threshold)
    order = torch.argsort(calibrated, descending=True)[:topk]
    return calibrated[order], order
