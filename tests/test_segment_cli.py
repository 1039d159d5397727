"""`flyeva segment train|eval|predict` end to end on generated ShapeWorld maps, and config errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flyeva.cli import main
from flyeva.config import load_config, recipe_path
from flyeva.models.weights import read_config
from flyeva.tasks.segment.config import SegmentConfig

# A few 64 px images, a 2-step run: the miniature recipe's path through the engine, not its accuracy.
TINY = [
    "data.shapeworld_train=16",
    "data.shapeworld_val=6",
    "model.patch_size=8",
    "model.upernet.channels=16",
    "model.upernet.aux_channels=8",
    "train.batch_size=4",
    "train.steps_per_epoch=2",
    "train.epochs=1",
    "train.device=cpu",
    "train.progress=false",
    "train.tensorboard=false",
    "optim.warmup_steps=1",
]
TINY_M2F = [
    "model.decoder=mask2former",
    "model.mask2former.num_queries=4",
    "model.mask2former.hidden_dim=32",
    "model.mask2former.num_heads=2",
    "model.mask2former.dim_feedforward=32",
    "model.mask2former.encoder_layers=1",
    "model.mask2former.decoder_layers=1",
    "model.mask2former.train_num_points=64",
]


@pytest.mark.slow
def test_train_eval_predict_on_shapeworld(tmp_path):
    out = tmp_path / "run"
    assert main(["segment", "train", f"train.output_dir={out}", *TINY]) in (0, None)
    record = json.loads((out / "result.json").read_text())
    trained, details = record["metrics"], record["details"]
    assert set(trained) == {"mIoU", "mAcc", "aAcc"} and record["step"] == 2
    assert list(details["per_class_iou"]) == ["background", "circle", "square", "triangle", "star", "cross"]
    assert details["pixels"] == 6 * 64 * 64  # every validation pixel is labelled (no 255 in ShapeWorld)
    config = read_config(out / "final")
    assert config["kind"] == "segmenter" and config["arch"]["decoder"] == "upernet"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["mIoU"] for r in records if r["kind"] == "eval"] == [pytest.approx(trained["mIoU"])]

    again = tmp_path / "eval"
    (data,) = (out / "data").iterdir()  # the generated ShapeWorld split
    overrides = ["--weights", str(out / "final"), "--output", str(again), f"data.root={data}"]
    overrides += [f"data.val={data / 'val' / 'semantic'}", f"data.train={data / 'train' / 'semantic'}"]
    assert main(["segment", "eval", *overrides, "train.device=cpu"]) in (0, None)
    evaluated = json.loads((again / "eval.json").read_text())["metrics"]
    assert evaluated["mIoU"] == pytest.approx(trained["mIoU"]) and evaluated["aAcc"] == pytest.approx(
        trained["aAcc"]
    )

    images = data / "val" / "semantic" / "images"
    assert main(
        ["segment", "predict", str(images), "--weights", str(out / "final"), "--output", str(tmp_path / "p")]
    ) in (0, None)
    overlays = sorted((tmp_path / "p").glob("*[0-9].png"))
    width, height = Image.open(overlays[0]).size
    assert len(overlays) == 6 and width == 2 * 64 * 8 and height > 64 * 8  # x8, beside its label file
    stored = Image.open(tmp_path / "p" / f"{overlays[0].stem}_labels.png")
    labels = np.array(stored)
    assert stored.mode == "P" and labels.shape == (64, 64) and labels.max() < 6
    assert len(json.loads((tmp_path / "p" / "legend.json").read_text())) == 6


@pytest.mark.slow
def test_mask2former_trains_through_the_engine(tmp_path):
    out = tmp_path / "m2f"
    assert main(
        ["segment", "train", f"train.output_dir={out}", *TINY, *TINY_M2F, "eval.mode=slide", "eval.stride=48"]
    ) in (0, None)
    summary = json.loads((out / "result.json").read_text())["metrics"]
    assert 0.0 <= summary["mIoU"] <= 1.0 and read_config(out / "final")["arch"]["decoder"] == "mask2former"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert train_records and {"loss_cross_entropy", "loss_mask", "loss_dice"} <= set(train_records[-1])


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.decoder=segformer", "model.decoder='segformer' is not one of"),
        ("eval.mode=tiles", "eval.mode='tiles' is not one of"),
        ("aug.ratio_range=[2.0,0.5]", "aug.ratio_range must be"),
        ("model.upernet.chanels=8", "did you mean 'model.upernet.channels'"),
    ],
)
def test_config_errors_exit_2_with_one_line(override, message, capsys):
    assert main(["segment", "train", override]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_data_root_is_required_for_ade20k(capsys):
    assert main(["segment", "train", "--config", "eva_base_ade20k_upernet"]) == 2
    assert "data.root" in capsys.readouterr().err


@pytest.mark.parametrize(
    "recipe",
    [
        "miniature",
        "eva_base_ade20k_upernet",
        "eva_large_ade20k_upernet",
        "eva_giant_ade20k_mask2former",
        "eva_giant_cocostuff_mask2former",
    ],
)
def test_recipes_load(recipe):
    cfg = load_config(SegmentConfig, recipe_path("segment", recipe))
    assert cfg.optim.schedule == "poly" and cfg.optim.poly_power == 1.0
    iterations = cfg.train.epochs * cfg.train.steps_per_epoch
    expected = {
        "miniature": ("upernet", None),
        "eva_base_ade20k_upernet": ("upernet", 80_000),
        "eva_large_ade20k_upernet": ("upernet", 80_000),
        "eva_giant_ade20k_mask2former": ("mask2former", 20_000),
        "eva_giant_cocostuff_mask2former": ("mask2former", 60_000),
    }[recipe]
    assert cfg.model.decoder == expected[0]
    if expected[1]:
        assert iterations == expected[1]


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    from safetensors.torch import load_file

    common = [*TINY, "train.epochs=2", "data.shapeworld_val=2", "model.drop_path_rate=0.0"]
    assert main(["segment", "train", f"train.output_dir={tmp_path / 'whole'}", *common]) in (0, None)
    assert main(
        ["segment", "train", f"train.output_dir={tmp_path / 'cut'}", *common, "train.max_steps=3"]
    ) in (0, None)
    assert main(["segment", "train", f"train.output_dir={tmp_path / 'cut'}", *common]) in (0, None)
    whole, resumed = (
        load_file(tmp_path / "whole/final/model.safetensors"),
        load_file(tmp_path / "cut/final/model.safetensors"),
    )
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
