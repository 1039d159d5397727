"""Segmentation data: layouts, label mapping, bad pairs skipped and counted, augmentation, exact resume."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from flyeva.tasks.segment.data import DataSection, label_lookup, open_split
from flyeva.tasks.segment.stream import SegmentationBatchStream
from flyeva.tasks.segment.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugSection,
    TrainTransform,
    cat_max_crop,
    rescale_size,
)


def _write_pair(images, labels, stem, label, size=(8, 6), label_name=None, image_ext=".jpg"):
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(images / f"{stem}{image_ext}")
    if label is not None:
        Image.fromarray(np.asarray(label, dtype=np.uint8)).save(labels / (label_name or f"{stem}.png"))


def test_ade20k_layout_reduces_zero_label_and_reports_out_of_range_values_once(tmp_path, caplog):
    label = np.array([[0, 1, 150, 255], [151, 2, 2, 200]] * 3, dtype=np.uint8)  # 6 x 4
    root = tmp_path / "ade"
    _write_pair(root / "images/training", root / "annotations/training", "ADE_train_1", label, size=(4, 6))
    pairs = open_split(DataSection(format="ade20k", root=str(root)), "train")
    assert len(pairs.classes) == 150 and pairs.classes[0] == "wall"
    with caplog.at_level(logging.WARNING):
        _, mapped = pairs.load_pair(0)
        pairs.load_pair(0)
    # 0 -> ignore, 1 -> 0, 150 -> 149, 255 stays, 151 and 200 are outside the 150 classes -> ignore
    assert mapped[:2].tolist() == [[255, 0, 149, 255], [255, 1, 1, 255]]
    warnings = [r.getMessage() for r in caplog.records if "outside" in r.getMessage()]
    assert len(warnings) == 1 and "ADE_train_1.png" in warnings[0] and "[151, 200]" in warnings[0]


def test_cocostuff_raw_ids_map_171_used_values_in_order():
    table = label_lookup(171, reduce_zero_label=False, raw_cocostuff=True)
    assert table[0] == 0 and table[10] == 10 and table[11] == 255 and table[12] == 11
    assert table[181] == 170 and table[182] == 255 and table[255] == 255
    assert int((table != 255).sum()) == 171


def test_folder_layout_with_classes_file(tmp_path):
    (tmp_path / "classes.txt").write_text("sky\nroad\n\n")
    _write_pair(tmp_path / "val/images", tmp_path / "val/labels", "a", np.ones((6, 8)), image_ext=".png")
    pairs = open_split(DataSection(format="folder", root=str(tmp_path)), "val")
    assert pairs.classes == ["sky", "road"] and pairs.load_pair(0)[1].max() == 1
    (tmp_path / "classes.txt").write_bytes(b"sky\nr\xf6ad\n")  # Latin-1: one line naming file and line
    with pytest.raises(ValueError, match=r"classes.txt line 2 is not valid UTF-8"):
        open_split(DataSection(format="folder", root=str(tmp_path)), "val")


def test_bad_pairs_are_skipped_counted_and_named(tmp_path, caplog):
    images, labels = tmp_path / "train/images", tmp_path / "train/labels"
    good = np.zeros((6, 8), dtype=np.uint8)
    for stem in ("good1", "good2"):
        _write_pair(images, labels, stem, good)
    _write_pair(images, labels, "missing_label", None)
    _write_pair(images, labels, "wrong_size", np.zeros((5, 8)))
    _write_pair(images, labels, "rgb_label", None)
    Image.new("RGB", (8, 6)).save(labels / "rgb_label.png")
    (images / "broken.jpg").write_bytes(b"not an image")
    _write_pair(images, labels, "unused", None)
    (images / "unused.jpg").unlink()
    pairs = open_split(DataSection(format="folder", root=str(tmp_path), classes=["a", "b"]), "train")
    assert len(pairs) == 6
    stream = SegmentationBatchStream(
        pairs, TrainTransform(AugSection(crop_size=4, scale=[8, 6])), batch_size=6
    )
    with caplog.at_level(logging.WARNING):
        batch = next(iter(stream))
    assert batch["num_skipped"] == 4 and batch["images"].shape[0] == 2 == batch["labels"].shape[0]
    text = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("missing_label", "wrong_size", "rgb_label", "broken.jpg"):
        assert name in text


def test_rescale_size_is_mmcv_keep_ratio():
    assert rescale_size(640, 480, 2048, 512) == (683, 512)  # short side bound: 512 / 480
    assert rescale_size(4000, 500, 2048, 512) == (2048, 256)  # long side bound: 2048 / 4000


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    label = np.zeros((4, 10), dtype=np.uint8)
    label[:, 8:] = 1  # class 1 in the two right columns; a 4x4 crop starts at column 0..6

    # Only column 6 gives a largest class share < 0.75 (2/4). mmseg checks 10 boxes and keeps the
    # 11th draw unchecked: P(column 6) = 1 - (6/7)^10 + (6/7)^10 / 7 = 0.817; without the rule 1/7.
    def share_of_column_6(ratio):
        boxes = [cat_max_crop(label, 4, ratio, np.random.default_rng(seed)) for seed in range(1400)]
        assert all(b - t == 4 and r - x == 4 for t, b, x, r in boxes)
        return sum(x == 6 for _, _, x, _ in boxes) / len(boxes)

    assert share_of_column_6(0.75) == pytest.approx(1 - (6 / 7) ** 10 + (6 / 7) ** 10 / 7, abs=0.03)
    assert share_of_column_6(1.0) == pytest.approx(1 / 7, abs=0.03)


def test_train_transform_pads_labels_with_ignore_and_normalises_with_imagenet_stats():
    image = Image.new("RGB", (6, 4), (124, 116, 104))
    label = np.ones((4, 6), dtype=np.uint8)
    aug = AugSection(
        crop_size=8, scale=[6, 4], ratio_range=[1.0, 1.0], cat_max_ratio=1.0, flip=0.0, photometric=False
    )
    pixels, labels = TrainTransform(aug)(image, label, np.random.default_rng(0))
    assert tuple(pixels.shape) == (3, 8, 8) and tuple(labels.shape) == (8, 8)
    assert labels[:4, :6].eq(1).all() and labels[4:].eq(255).all() and labels[:, 6:].eq(255).all()
    expected = (torch.tensor([124.0, 116, 104]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[:, 0, 0], expected)
    assert pixels[:, 5:, 7:].eq(0).all()


def _shapes_pairs(tmp_path, count=10):
    rng = np.random.default_rng(0)
    for index in range(count):
        label = rng.integers(0, 3, (12, 12)).astype(np.uint8)
        _write_pair(
            tmp_path / "train/images", tmp_path / "train/labels", f"{index:02d}", label, size=(12, 12)
        )
    return open_split(DataSection(format="folder", root=str(tmp_path), classes=list("abc")), "train")


@pytest.mark.parametrize("workers", [1, 2])
def test_stream_resumes_exactly_and_walks_endless_passes(tmp_path, workers):
    pairs = _shapes_pairs(tmp_path)
    aug = AugSection(crop_size=8, scale=[24, 12])

    def batches(epoch, skip):
        stream = SegmentationBatchStream(pairs, TrainTransform(aug), batch_size=3, batches_per_epoch=4)
        stream.set_epoch(epoch, skip)
        if workers == 1:
            return list(stream)
        return list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, in_order=True))

    full = batches(1, [0] * workers)
    assert [b["index"] for b in full] == ([0, 1, 2, 3] if workers == 1 else [0, 0, 1, 1])
    resumed = batches(1, [2] if workers == 1 else [1, 1])  # two batches consumed
    assert len(resumed) == 2
    for got, want in zip(resumed, full[2:]):
        torch.testing.assert_close(got["images"], want["images"])
        assert torch.equal(got["labels"], want["labels"])
    # 4 batches x 3 = 12 samples per epoch from 10 pairs: epoch 1 reads positions 12..23 (passes 1 and 2)
    assert not torch.equal(full[0]["labels"], batches(0, [0] * workers)[0]["labels"])


def test_an_epoch_is_its_stretch_of_the_endless_passes(tmp_path):
    aug = AugSection(crop_size=8, scale=[24, 12])
    stream = SegmentationBatchStream(
        _shapes_pairs(tmp_path), TrainTransform(aug), batch_size=3, batches_per_epoch=4
    )
    stream.set_epoch(1)  # positions 12..23: the last 8 of pass 1, then the first 4 of pass 2
    order = stream.rank_order().tolist()
    assert order == [2, 6, 7, 9, 0, 5, 3, 8, 4, 9, 5, 1]  # the permutations of seed 0, passes 1 and 2
    assert len(set(order[:8])) == 8 and len(set(order[8:])) == 4


def test_a_16_bit_label_above_255_and_a_label_bomb_are_unreadable_pairs_not_ignore(tmp_path, monkeypatch):
    """A value of 300 in a 16-bit PNG was read as 255 (ignore), silently; a PNG whose header claims more
    than the pixel cap is named before it is decoded."""
    from flyeva.data.sources import UnreadableTargetError
    from flyeva.tasks.segment import data as segment_data

    images, labels = tmp_path / "val/images", tmp_path / "val/labels"
    _write_pair(images, labels, "wide", None, size=(4, 2))
    Image.fromarray(np.array([[0, 1, 300, 1], [1, 1, 1, 0]], dtype=np.uint16)).save(labels / "wide.png")
    _write_pair(images, labels, "fine", None, size=(4, 2))
    Image.fromarray(np.array([[0, 1, 255, 1], [1, 1, 1, 0]], dtype=np.uint16)).save(labels / "fine.png")
    pairs = open_split(DataSection(format="folder", root=str(tmp_path), classes=["a", "b"]), "val")
    by_name = {p[1].name: i for i, p in enumerate(pairs.pairs)}
    assert pairs.load_pair(by_name["fine.png"])[1].tolist() == [[0, 1, 255, 1], [1, 1, 1, 0]]
    with pytest.raises(UnreadableTargetError, match=r"wide\.png holds label values up to 300"):
        pairs.load_pair(by_name["wide.png"])
    monkeypatch.setattr(segment_data, "DEFAULT_MAX_PIXELS", 7)  # 4 x 2 = 8 pixels: over the cap
    with pytest.raises(UnreadableTargetError, match=r"fine\.png claims 4x2 pixels"):
        pairs.load_pair(by_name["fine.png"])
