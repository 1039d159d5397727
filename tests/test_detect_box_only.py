"""A detector without a mask branch (`model.mask_head=false`): the Objects365 stage of the paper's chain.

Box-only data (Objects365 has no masks) trains and evaluates box AP only; its weights start a mask
detector of another label set (Objects365 -> COCO) with the class layers and the mask branch fresh
and every other tensor carried over exactly, named in one log line.
"""

import json

import pytest
import torch
from test_detect_train import TINY_RUN

from flyeva.cli import main
from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.tasks.detect.build import build_detector
from flyeva.tasks.detect.config import DetectConfig

torch.set_num_threads(1)


def box_only_export(folder, num, start=0, keep_classes=None):
    """A ShapeWorld COCO export with every segmentation removed (and optionally fewer categories)."""
    export = ["shapeworld", "export", "--out", str(folder), "--num", str(num), "--start", str(start)]
    assert main([*export, "--formats", "coco", "--image-size", "32"]) == 0
    path = folder / "coco" / "instances.json"
    document = json.loads(path.read_text())
    for annotation in document["annotations"]:
        annotation.pop("segmentation")
    if keep_classes is not None:
        document["categories"] = [c for c in document["categories"] if c["id"] in keep_classes]
        document["annotations"] = [a for a in document["annotations"] if a["category_id"] in keep_classes]
    path.write_text(json.dumps(document))
    return path


def test_lsj_moves_boxes_as_it_moves_the_masks_they_bound():
    """Without masks the boxes are flipped, scaled, cropped and clipped; they equal the boxes of the
    same transform applied to box-shaped masks (detectron2's box transform, the release's LSJ)."""
    import numpy as np
    from PIL import Image

    from flyeva.tasks.detect.transforms import LargeScaleJitter

    image = Image.new("RGB", (40, 30))
    boxes = np.array([[4, 6, 20, 18], [30, 2, 40, 30], [0, 0, 2, 2]], dtype=np.float32)
    masks = np.zeros((3, 30, 40), bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.astype(int)):
        mask[y0:y1, x0:x1] = True
    labels = np.array([0, 1, 2])
    for seed in range(20):
        transform = LargeScaleJitter(32, 0.5, 2.0, flip=0.5)
        torch.manual_seed(seed)
        from_masks = transform(image, masks, labels)
        torch.manual_seed(seed)
        from_boxes = transform(image, None, labels, boxes)
        assert from_boxes.masks is None and torch.equal(from_boxes.image, from_masks.image)
        assert torch.equal(from_boxes.labels, from_masks.labels), seed
        # mask boxes snap to whole pixels after a nearest resize: within one pixel
        torch.testing.assert_close(from_boxes.boxes, from_masks.boxes, atol=1.01, rtol=0)


def test_a_box_only_file_is_refused_for_a_mask_detector_naming_the_option(tmp_path, capsys):
    train = box_only_export(tmp_path / "o365", 4)
    run = ["detect", "train", f"train.output_dir={tmp_path / 'run'}", *TINY_RUN, f"data.train_json={train}"]
    assert main([*run, "data.shapeworld_val=0"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no image has a usable annotation" in error
    assert "model.mask_head=false" in error and str(train) in error
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_box_only_detector_trains_evaluates_boxes_and_starts_a_mask_detector(tmp_path, caplog):
    from safetensors.torch import load_file

    train = box_only_export(tmp_path / "o365_train", 8)
    val = box_only_export(tmp_path / "o365_val", 4, start=100)
    out = tmp_path / "o365"
    run = ["detect", "train", f"train.output_dir={out}", *TINY_RUN, "model.mask_head=false"]
    assert main([*run, f"data.train_json={train}", f"data.val_json={val}"]) == 0
    metrics = json.loads((out / "result.json").read_text())["metrics"]
    assert "bbox_AP" in metrics and 0.0 <= metrics["bbox_AP"] <= 1.0
    assert not [name for name in metrics if name.startswith("segm")]  # boxes only, not -1 masks
    detections = json.loads((out / "detections.json").read_text())
    assert detections and all("segmentation" not in d for d in detections)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["arch"]["roi_heads"]["mask_dims"] == []
    state = load_file(str(out / "final" / "model.safetensors"))
    assert not [k for k in state if "mask" in k]
    # detect eval of the folder: its own box-only architecture, bbox only
    evaluate = ["detect", "eval", f"model.init={out / 'final'}", f"train.output_dir={tmp_path / 'eval'}"]
    assert main([*evaluate, *TINY_RUN, f"data.val_json={val}"]) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]
    assert again == pytest.approx(metrics)

    # Objects365 -> COCO: a 3-class mask detector from the 5-class box-only one
    cfg = load_config(
        DetectConfig, recipe_path("detect", "miniature"), [*TINY_RUN, f"model.init={out / 'final'}"]
    )
    with caplog.at_level("INFO"):
        detector = build_detector(cfg, 3)
    lines = [r.getMessage() for r in caplog.records if "start fresh" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "6 class-specific tensors start fresh (another label set: 5 -> 3 classes)" in lines[0]
    own = detector.state_dict()
    masks = [k for k in own if k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor."))]
    assert masks and f"{len(masks)} mask-branch tensors start fresh (the file has no mask head)" in lines[0]
    kept = [k for k in state if ".cls_score." not in k]
    assert all(torch.equal(own[k], state[k]) for k in kept)  # the rest carries over exactly
    assert own["roi_heads.box_predictor.0.cls_score.weight"].shape[0] == 4
    assert own["roi_heads.mask_predictor.mask_fcn_logits.weight"].shape[0] == 3
    # evaluating the box-only folder as a mask detector, or with another label set, is one error
    with pytest.raises(ConfigError, match="predicts 5 classes"):
        build_detector(cfg, 3, training=False)
