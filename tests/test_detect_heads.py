"""Detection heads: aligned pooler, cascade matching and scoring, Soft-NMS, maskness, LVIS losses/sampling."""

import math

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms, roi_align

from flyeva.tasks.detect.cascade import STAGE_WEIGHTS, CascadeRoIHeads, RoIHeadsConfig, _ScaleGradient
from flyeva.tasks.detect.lvis import (
    fed_loss_classes,
    fed_loss_weights,
    repeat_factors,
    repeated_indices,
    sigmoid_ce_loss,
)
from flyeva.tasks.detect.pooler import AlignedMultiScaleRoIAlign, assign_levels
from flyeva.tasks.detect.postprocess import calibrate_scores, maskness, per_class_detections, soft_nms

torch.set_num_threads(1)


def small_heads(**changes) -> CascadeRoIHeads:
    cfg = RoIHeadsConfig(
        num_classes=3, strides=[4, 8], channels=8, conv_dims=[8], fc_dims=[16], mask_dims=[8],
        batch_size_per_image=16, **changes,
    )  # fmt: skip
    return CascadeRoIHeads(cfg)


def test_level_assignment_is_fpn_equation_one():
    boxes = torch.tensor([[0, 0, 50, 50], [0, 0, 112, 112], [0, 0, 224, 224], [0, 0, 500, 500.0]])
    # floor(4 + log2(side / 224)) = 1.8 -> 1 (clamped to 2), 3, 4, 5
    assert assign_levels(boxes, 2, 5).tolist() == [0, 1, 2, 3]


def test_aligned_pooler_equals_roi_align_aligned_on_the_right_level():
    torch.manual_seed(0)
    strides = [4, 8, 16, 32]
    features = [torch.randn(2, 3, 256 // s, 256 // s) for s in strides]
    boxes = [
        torch.tensor([[3.0, 5.0, 53.0, 40.0], [10.0, 10.0, 122.0, 122.0]]),
        torch.tensor([[0, 0, 250, 240.0]]),
    ]
    pooled = AlignedMultiScaleRoIAlign(strides, 7)(features, boxes)
    expected_levels = [
        0,
        1,
        2,
    ]  # sqrt areas 41.8, 112, 245 -> levels 1.6 (clamped 2), 3, 4.1: strides 4, 8, 16
    rois = [(0, boxes[0][0]), (0, boxes[0][1]), (1, boxes[1][0])]
    for row, ((image, box), level) in enumerate(zip(rois, expected_levels)):
        roi = torch.cat([torch.tensor([float(image)]), box])[None]
        ref = roi_align(features[level], roi, (7, 7), 1 / strides[level], 0, aligned=True)
        torch.testing.assert_close(pooled[row : row + 1], ref, rtol=0, atol=0)
        unaligned = roi_align(features[level], roi, (7, 7), 1 / strides[level], 0, aligned=False)
        assert (pooled[row : row + 1] - unaligned).abs().max() > 1e-3  # the half-pixel shift matters


def test_soft_nms_linear_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 7], [20, 20, 30, 30.0]])  # IoU(0, 1) = 70 / 100
    scores = torch.tensor([0.9, 0.8, 0.5])
    keep, new_scores = soft_nms(boxes, scores, iou_threshold=0.6, min_score=1e-3)
    assert keep.tolist() == [0, 2, 1]
    torch.testing.assert_close(new_scores, torch.tensor([0.9, 0.5, 0.8 * 0.3]))
    keep, _ = soft_nms(boxes, scores, iou_threshold=0.6, min_score=0.3)  # 0.24 falls under min_score
    assert keep.tolist() == [0, 2]
    keep, _ = soft_nms(boxes, scores, iou_threshold=0.75)  # IoU 0.7 is not above the threshold: no decay
    assert keep.tolist() == [0, 1, 2]


def test_soft_nms_with_a_hard_cut_equals_batched_nms():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 80
    boxes = torch.cat([corners, corners + 5 + torch.rand(300, 2, generator=generator) * 30], 1)
    scores = torch.rand(300, generator=generator)
    probs = torch.zeros(300, 3)
    probs[torch.arange(300), torch.randint(0, 3, (300,), generator=generator)] = scores
    kept_boxes, _, _ = per_class_detections(boxes, probs, 0.0, 0.5, 1000, nms="hard")
    rows = torch.nonzero(probs > 0)
    reference = batched_nms(boxes[rows[:, 0]], probs[rows[:, 0], rows[:, 1]], rows[:, 1], 0.5)
    from flyeva.tasks.detect.postprocess import batched_soft_nms

    keep, _ = batched_soft_nms(
        boxes[rows[:, 0]],
        probs[rows[:, 0], rows[:, 1]],
        rows[:, 1],
        iou_threshold=0.5,
        min_score=0.0,
        method="hard",
    )
    assert keep.tolist() == reference.tolist()
    assert len(kept_boxes) == len(reference)
    _, soft_scores, _ = per_class_detections(boxes, probs, 0.0, 0.5, 7, nms="soft")
    assert len(soft_scores) == 7  # the per-image cap holds after Soft-NMS (the release skips it)


def test_maskness_arithmetic_and_real_resort():
    probs = torch.tensor([[[0.9, 0.7], [0.2, 0.4]], [[1.0, 1.0], [1.0, 0.1]], [[0.1, 0.2], [0.3, 0.4]]])
    torch.testing.assert_close(maskness(probs), torch.tensor([0.8, 1.0, 0.0]), atol=1e-5, rtol=0)
    scores, order = calibrate_scores(torch.tensor([0.9, 0.85, 0.7]), probs, topk=2)
    assert order.tolist() == [1, 0]  # 0.85 x 1.0 > 0.9 x 0.8 > 0.7 x 0
    torch.testing.assert_close(scores, torch.tensor([0.85, 0.72]), atol=1e-5, rtol=0)


def test_iou_055_proposal_is_foreground_only_at_stage_zero():
    heads = small_heads()
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([2])}
    proposal = torch.tensor([[0.0, 0.0, 10.0, 5.5]])  # IoU 0.55
    classes = [heads.match([proposal], [target], stage)[0][0].item() for stage in range(3)]
    assert classes == [2, 3, 3]  # class 2, then background (index K = 3)
    assert [coder.weights for coder in heads.box_coders] == list(STAGE_WEIGHTS)


def test_stage_gradient_is_scaled_by_one_third():
    x = torch.ones(3, requires_grad=True)
    _ScaleGradient.apply(x, 1 / 3).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3,), 1 / 3))


def test_test_scores_average_the_three_stages():
    heads = small_heads(score_threshold=0.0, detections_per_image=100).eval()
    for stage, bias in enumerate([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 2.0]]):
        torch.nn.init.zeros_(heads.box_predictor[stage].cls_score.weight)
        heads.box_predictor[stage].cls_score.bias.data = torch.tensor(bias)
        torch.nn.init.zeros_(heads.box_predictor[stage].bbox_pred.weight)  # boxes stay where they are
    features = [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    proposal = torch.tensor([[4.0, 4.0, 30.0, 30.0]])
    with torch.no_grad():
        result = heads(features, [proposal], [(64, 64)])[0]
    probs = torch.stack(
        [torch.tensor(b).softmax(0) for b in ([2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 2.0])]
    )
    expected = probs.mean(0)[:3]
    by_label = dict(zip(result["labels"].tolist(), result["scores"].tolist()))
    assert by_label == pytest.approx({k: float(expected[k]) for k in range(3)}, abs=1e-6)
    torch.testing.assert_close(result["boxes"], proposal.expand(3, 4))
    assert result["mask_probs"].shape == (3, 28, 28)


def test_training_losses_are_finite_and_complete():
    torch.manual_seed(0)
    heads = small_heads().train()
    features = [torch.randn(1, 8, 16, 16, requires_grad=True), torch.randn(1, 8, 8, 8)]
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 4:30, 4:30] = True
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}
    losses = heads(
        features, [torch.tensor([[5.0, 5.0, 29.0, 31.0], [40, 40, 60, 60.0]])], [(64, 64)], [target]
    )
    assert sorted(losses) == sorted(
        [f"loss_{kind}_stage{k}" for kind in ("cls", "box") for k in range(3)] + ["loss_mask"]
    )
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert features[0].grad.abs().sum() > 0


def test_repeat_factors_hand_computed():
    images = [[1, 2], [2], [2], [2, 2], []]  # category 1 in 1 of 5 images, category 2 in 4 of 5
    factors = repeat_factors(images, threshold=0.5)
    # r(1) = sqrt(0.5 / 0.2) = 1.5811; r(2) = max(1, sqrt(0.5 / 0.8)) = 1; no annotations -> 1
    np.testing.assert_allclose(factors, [math.sqrt(2.5), 1, 1, 1, 1])
    counts = np.stack(
        [np.bincount(repeated_indices(factors, np.random.default_rng(s)), minlength=5) for s in range(400)]
    )
    assert set(counts[:, 0].tolist()) == {1, 2} and (counts[:, 1:] == 1).all()
    assert abs(counts[:, 0].mean() - math.sqrt(2.5)) < 0.08  # stochastic rounding keeps the mean


def test_fed_loss_class_sampling():
    weights = fed_loss_weights([100, 4, 0, 9, 16, 25])
    torch.testing.assert_close(weights, torch.tensor([10.0, 2, 0, 3, 4, 5]))
    generator = torch.Generator().manual_seed(0)
    gt = torch.tensor([1, 1, 6, 6])  # 6 = background
    for _ in range(20):
        classes = fed_loss_classes(gt, 6, weights, num_sampled=3, generator=generator)
        assert classes[0] == 1 and len(classes) == 3 and 2 not in classes.tolist()  # weight 0: never drawn
    assert sorted(fed_loss_classes(gt, 6, weights, num_sampled=10).tolist()) == [0, 1, 3, 4, 5]
    assert fed_loss_classes(torch.tensor([0, 3, 4]), 6, weights, num_sampled=2).tolist() == [0, 3, 4]


def test_sigmoid_fed_loss_hand_computed():
    logits = torch.zeros(2, 4)  # K = 3 classes + background
    gt = torch.tensor([0, 3])
    # all logits 0: BCE = log 2 per entry; plain sigmoid CE = 2 rows x 3 classes x log 2 / 2 rows
    torch.testing.assert_close(sigmoid_ce_loss(logits, gt), torch.tensor(3 * math.log(2)))
    weights = torch.tensor([1.0, 0.0, 1.0])  # class 0 is present; class 2 is the only drawable negative
    loss = sigmoid_ce_loss(logits, gt, weights, num_sampled=2)
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(2)))  # 2 rows x 2 classes / 2 rows
