"""Segmentation metrics against mmseg's `intersect_and_union`, predictions outside the classes included.

The reference is mmseg's formula written out here with torch.histc (bins = classes, range [0, C - 1],
so values outside are dropped): area_intersect from pred == label, area_pred_label and area_label
from the histograms, union = pred + label - intersect, summed over the images before dividing.
"""

import math

import pytest
import torch

from flyeva.tasks.segment.evaluate import confusion_matrix, segmentation_metrics

IGNORE = 255


def mmseg_areas(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """mmseg's intersect_and_union: (area_intersect, area_union, area_pred_label, area_label)."""
    mask = label != IGNORE
    pred, label = pred[mask].float(), label[mask].float()
    intersect = pred[pred == label]

    def histogram(values: torch.Tensor) -> torch.Tensor:
        return torch.histc(values, bins=num_classes, min=0, max=num_classes - 1).double()

    area_intersect, area_pred, area_label = histogram(intersect), histogram(pred), histogram(label)
    return area_intersect, area_pred + area_label - area_intersect, area_pred, area_label


def mmseg_metrics(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> dict[str, object]:
    """mmseg's total_intersect_and_union, then aAcc, per-class IoU / Acc and their nanmeans."""
    totals = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
    for pred, label in pairs:
        totals = [t + a for t, a in zip(totals, mmseg_areas(pred, label, num_classes))]
    intersect, union, _, label_area = totals
    iou, accuracy = intersect / union, intersect / label_area
    return {
        "aAcc": float(intersect.sum() / label_area.sum()),
        "IoU": iou.tolist(),
        "Acc": accuracy.tolist(),
        "mIoU": float(iou.nanmean()),
        "mAcc": float(accuracy.nanmean()),
    }


def assert_matches_mmseg(pairs: list[tuple[torch.Tensor, torch.Tensor]], num_classes: int) -> None:
    size = num_classes + 1
    confusion = torch.zeros(size, size, dtype=torch.int64)
    for pred, label in pairs:
        confusion += confusion_matrix(pred, label, num_classes)
    ours = segmentation_metrics(confusion, [str(c) for c in range(num_classes)])
    reference = mmseg_metrics(pairs, num_classes)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key
    for ours_values, reference_values in (
        (ours["per_class_iou"], reference["IoU"]),
        (ours["per_class_acc"], reference["Acc"]),
    ):
        for value, expected in zip(ours_values.values(), reference_values):
            if math.isnan(expected):
                assert value is None
            else:
                assert value == pytest.approx(expected, abs=1e-12)


def test_a_prediction_of_255_on_a_labelled_pixel_is_a_missed_pixel_of_its_class():
    label = torch.tensor([0, 0, 1, 1, 2, IGNORE, 2])
    pred = torch.tensor([0, IGNORE, 1, IGNORE, 2, IGNORE, 0])
    # by hand (mmseg): intersect [1, 1, 1], predicted [2, 1, 1], labelled [2, 2, 2], union [3, 2, 2]
    metrics = segmentation_metrics(confusion_matrix(pred, label, 3), ["a", "b", "c"])
    assert metrics["per_class_iou"] == pytest.approx({"a": 1 / 3, "b": 1 / 2, "c": 1 / 2})
    assert metrics["per_class_acc"] == pytest.approx({"a": 1 / 2, "b": 1 / 2, "c": 1 / 2})
    assert metrics["aAcc"] == pytest.approx(3 / 6) and metrics["pixels"] == 6
    assert_matches_mmseg([(pred, label)], 3)


def test_metrics_equal_mmseg_with_predictions_and_labels_outside_the_classes():
    generator = torch.Generator().manual_seed(0)
    num_classes = 20  # label * C + 255 < C^2: an unguarded code lands in another class's cell
    pairs = []
    for size in (7, 12, 9):
        label = torch.randint(0, num_classes - 2, (size, size), generator=generator)  # 18, 19 never labelled
        label[torch.rand(size, size, generator=generator) < 0.1] = IGNORE
        label[0, :2] = 30  # outside the classes, not ignored: mmseg counts only its prediction
        noise = torch.randint(0, num_classes, (size, size), generator=generator)
        pred = torch.where(torch.rand(size, size, generator=generator) < 0.6, label, noise)
        pred[torch.rand(size, size, generator=generator) < 0.15] = IGNORE
        pred[1, :3] = torch.tensor([21, 254, num_classes])  # other out-of-range predictions
        pairs.append((pred, label))
    assert_matches_mmseg(pairs, num_classes)
