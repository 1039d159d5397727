"""Segmentation evaluation: dataset-level metrics, sliding windows, multi-scale + flip averaging."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from flyeva.tasks.segment.evaluate import (
    EvalSection,
    confusion_matrix,
    predict_probabilities,
    segmentation_metrics,
    slide_inference,
    slide_windows,
    whole_inference,
)


def test_metrics_match_a_hand_computed_confusion_matrix_with_ignore_and_absent_classes():
    # 4 classes; class 3 never occurs (NaN, skipped); class 2 is predicted but never labelled (IoU 0).
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255, 0, 1, 1])
    pred = torch.tensor([0, 0, 1, 1, 2, 3, 0, 0, 1, 0])
    confusion = confusion_matrix(pred, target, 4)
    # row / column 4 count labels / predictions outside the classes: none here
    assert confusion.tolist() == [[3, 1, 0, 0, 0], [1, 2, 1, 0, 0], [0] * 5, [0] * 5, [0] * 5]
    metrics = segmentation_metrics(confusion, ["a", "b", "c", "d"])
    iou = {"a": 3 / (4 + 4 - 3), "b": 2 / (4 + 3 - 2), "c": 0.0, "d": None}
    assert metrics["per_class_iou"] == pytest.approx(iou)
    assert metrics["mIoU"] == pytest.approx((3 / 5 + 2 / 5 + 0) / 3)
    assert metrics["per_class_acc"] == pytest.approx({"a": 3 / 4, "b": 2 / 4, "c": None, "d": None})
    assert metrics["mAcc"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert metrics["aAcc"] == pytest.approx(5 / 8)
    assert metrics["pixels"] == 8


def test_metrics_are_accumulated_over_the_dataset_as_torchmetrics_macro_jaccard():
    generator = torch.Generator().manual_seed(0)
    jaccard = MulticlassJaccardIndex(num_classes=5, ignore_index=255, average="macro")
    accuracy = MulticlassAccuracy(num_classes=5, ignore_index=255, average="micro")
    confusion = torch.zeros(6, 6, dtype=torch.int64)  # 5 classes + outside
    for size in (6, 9, 4):  # images of different sizes and class mixes
        target = torch.randint(0, 4, (size, size), generator=generator)  # class 4 never labelled
        target[0] = 255
        pred = torch.where(
            torch.rand(size, size, generator=generator) < 0.6,
            target,
            torch.randint(0, 5, (size, size), generator=generator),
        )
        pred[pred == 255] = 0
        jaccard.update(pred.flatten(), target.flatten())
        accuracy.update(pred.flatten(), target.flatten())
        confusion += confusion_matrix(pred, target, 5)
    metrics = segmentation_metrics(confusion, list("abcde"))
    assert metrics["mIoU"] == pytest.approx(float(jaccard.compute()), abs=1e-6)
    assert metrics["aAcc"] == pytest.approx(float(accuracy.compute()), abs=1e-6)


def test_slide_windows_are_mmseg_grid_with_the_last_window_shifted_inside():
    assert slide_windows(10, 10, crop=6, stride=4) == [
        (0, 0, 6, 6),
        (0, 4, 6, 10),
        (4, 0, 10, 6),
        (4, 4, 10, 10),
    ]
    # 13 wide: columns at 0, 4, then 8 -> shifted back to 7 so it ends at 13
    assert [box[1] for box in slide_windows(6, 13, crop=6, stride=4)] == [0, 4, 7]
    assert slide_windows(4, 5, crop=6, stride=4) == [(0, 0, 4, 5)]  # smaller than the crop: one window


class PointwiseModel(nn.Module):
    """A translation-equivariant toy segmenter: a per-pixel MLP (1x1 convolutions)."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Tanh(), nn.Conv2d(8, classes, 1))
        self.calls: list[tuple[int, ...]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(images.shape))
        return self.body(images)


@pytest.mark.parametrize(
    "height,width", [(5, 7), (8, 8), (13, 19)]
)  # smaller than, equal to, larger than the crop
def test_slide_inference_equals_whole_inference_for_a_translation_equivariant_model(height, width):
    torch.manual_seed(0)
    model = PointwiseModel()
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        whole = model(images)
        model.calls.clear()
        slid = slide_inference(model, images, 3, crop=8, stride=5, window_batch=2)
    torch.testing.assert_close(slid, whole, atol=1e-6, rtol=1e-6)
    windows = len(slide_windows(height, width, 8, 5))
    assert sum(shape[0] for shape in model.calls) == 2 * windows  # every window once, batch of 2 images each
    assert all(shape[-2:] == (8, 8) for shape in model.calls)  # windows padded to the crop


def test_slide_inference_averages_overlapping_windows():
    class Counter(nn.Module):  # each window outputs its own index: the average is checkable by hand
        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            outputs = torch.arange(self.seen, self.seen + len(images), dtype=torch.float32).view(-1, 1, 1, 1)
            self.seen += len(images)
            return outputs.expand(-1, 1, *images.shape[-2:])

    scores = slide_inference(Counter(), torch.zeros(1, 3, 6, 10), 1, crop=6, stride=4)
    # windows: columns [0, 6) -> 0 and [4, 10) -> 1; columns 4 and 5 average to 0.5
    assert scores[0, 0, 0].tolist() == [0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1]


def test_whole_inference_pads_to_the_size_divisor_and_cuts_back():
    model = PointwiseModel()
    images = torch.randn(1, 3, 10, 13)
    with torch.no_grad():
        scores = whole_inference(model, images, size_divisor=8)
        torch.testing.assert_close(scores, model.body(images))
    assert model.calls[0][-2:] == (16, 16)


class TiltedModel(nn.Module):
    """Not flip-symmetric (output depends on the left neighbour), so flip averaging is visible."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        left = F.pad(images[..., :-1], (1, 0))
        return torch.stack([images[:, 0] - left[:, 0], images[:, 1] + 0.5 * left[:, 2]], 1)


def test_multi_scale_and_flip_average_softmax_probabilities_at_the_original_size():
    image = torch.randn(1, 3, 8, 12)
    cfg = EvalSection(mode="whole", scale=[24, 8], ratios=[0.5, 1.0, 1.5], flip=True)
    got = predict_probabilities(TiltedModel(), image, 2, cfg, size_divisor=1)
    expected = torch.zeros(1, 2, 8, 12)
    for ratio in (0.5, 1.0, 1.5):
        height, width = round(8 * ratio), round(12 * ratio)  # keep ratio: 8 px short side x ratio
        scaled = F.interpolate(image, size=(height, width), mode="bilinear", align_corners=False)
        for flipped in (False, True):
            inputs = scaled.flip(-1) if flipped else scaled
            logits = TiltedModel()(inputs)
            logits = logits.flip(-1) if flipped else logits
            expected += F.interpolate(logits, size=(8, 12), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(got, expected / 6)
    single = predict_probabilities(TiltedModel(), image, 2, EvalSection(mode="whole", scale=[24, 8]), 1)
    assert not torch.allclose(single, got)  # the extra scales and flips changed the answer
    torch.testing.assert_close(got.sum(1), torch.ones(1, 8, 12))
    assert math.isclose(float(single.sum()), 8 * 12, rel_tol=1e-5)
