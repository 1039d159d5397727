"""`flyeva video`: multi-view evaluation numbers, the recipes, and train -> eval end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flyeva.cli import main
from flyeva.config import load_config, recipe_path
from flyeva.engine.loop import StepContext
from flyeva.models.weights import load
from flyeva.tasks.video.config import VideoConfig
from flyeva.tasks.video.evaluate import VideoEvaluator, average_views
from flyeva.tasks.video.objective import VideoObjective

RECIPES = (
    "miniature",
    "eva_giant_k722_8f",
    "eva_giant_k400_16f",
    "eva_giant_k600_16f",
    "eva_giant_k700_16f",
    "eva_base_k400",
)


def test_views_are_averaged_as_probabilities_not_logits():
    logits = torch.tensor([[[10.0, 0.0], [0.0, 2.0], [0.0, 2.0]]])
    probs = average_views(logits)
    p_view = torch.tensor([1 / (1 + torch.e**-10), 1 / (1 + torch.e**2)])  # softmax class-0 of each view
    expected0 = (p_view[0] + 2 * p_view[1]) / 3
    assert torch.allclose(probs, torch.tensor([[expected0, 1 - expected0]]), atol=1e-6)
    assert probs.argmax().item() == 1 and logits.mean(1).argmax().item() == 0  # the two rules disagree here


class LogitsInPixels(nn.Module):
    """A stand-in model whose clip [N, 1, 1, 1, K] holds its own logits."""

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return clips[:, 0, 0, 0]


class ListStream:
    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch, skip=()):
        pass

    def __iter__(self):
        return iter(self.batches)


def test_evaluator_top1_top5_and_mean_class_accuracy_by_hand():
    # 3 classes; video logits per view (2 views). Predictions (softmax-averaged): 0, 0, 2, 1.
    views = torch.tensor(
        [
            [[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]],
            [[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]],
            [[0.0, 0.0, 4.0], [0.0, 1.0, 4.0]],
            [[0.0, 6.0, 0.0], [0.0, 6.0, 1.0]],
        ]
    )
    labels = torch.tensor([0, 1, 2, 1])  # correct: videos 0, 2, 3 -> top-1 75 %; class 1: 1 of 2
    batches = [
        {"clips": views[:3].view(3, 2, 1, 1, 1, 3), "labels": labels[:3], "num_skipped": 0},
        {"clips": views[3:].view(1, 2, 1, 1, 1, 3), "labels": labels[3:], "num_skipped": 1},
    ]
    evaluator = VideoEvaluator(ListStream(batches), num_classes=3)
    metrics = evaluator(LogitsInPixels(), StepContext(0, 0, 0, 0, 0, torch.device("cpu")))
    assert metrics["top1"] == pytest.approx(75.0)
    assert metrics["top5"] == pytest.approx(100.0)
    assert metrics["mean_class_top1"] == pytest.approx(100 * (1 + 0.5 + 1) / 3)
    assert evaluator.last == {"videos": 4, "skipped_videos": 1}
    probs = average_views(views)
    assert metrics["loss"] == pytest.approx(float(-probs[torch.arange(4), labels].log().mean()), rel=1e-6)


def test_cutmix_cuts_the_same_box_from_every_frame():
    objective = VideoObjective(4, smoothing=0.0, mixup={"mixup_alpha": 0.0, "cutmix_alpha": 1.0, "prob": 1.0})
    seen = {}

    class Spy(nn.Module):
        def forward(self, clips):
            seen["clips"] = clips
            return torch.zeros(len(clips), 4, requires_grad=True)

    clips = torch.stack([torch.zeros(3, 3, 8, 8), torch.ones(3, 3, 8, 8)])  # [B=2, T=3, C, H, W]
    batch = {"clips": clips, "labels": torch.tensor([0, 1])}
    objective(Spy(), batch, StepContext(0, 0, 0, 0, 0, torch.device("cpu")))
    mixed = seen["clips"][0]  # clip 0 with a box from clip 1
    box = mixed[0, 0] == 1
    assert 0 < box.sum() < 64
    assert all(torch.equal(mixed[t, c] == 1, box) for t in range(3) for c in range(3))


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_load(name):
    cfg = load_config(VideoConfig, recipe_path("video", name))
    assert cfg.model.num_frames in (8, 16)
    assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.05


def test_release_recipe_numbers():
    k722 = load_config(VideoConfig, recipe_path("video", "eva_giant_k722_8f"))
    assert (k722.model.num_frames, k722.train.epochs, k722.optim.warmup_epochs) == (8, 40, 5)
    assert (k722.optim.lr, k722.optim.min_lr, k722.optim.schedule) == (8e-6, 8e-8, "cosine")
    assert (k722.aug.mixup, k722.aug.cutmix, k722.model.drop_path_rate) == (0.8, 1.0, 0.3)
    assert k722.optim.layer_decay == 1.0
    for name, epochs in (("eva_giant_k400_16f", 1), ("eva_giant_k600_16f", 2), ("eva_giant_k700_16f", 2)):
        kx = load_config(VideoConfig, recipe_path("video", name))
        assert (kx.model.num_frames, kx.train.epochs, kx.optim.lr, kx.optim.schedule) == (
            16,
            epochs,
            1e-6,
            "constant",
        )
        assert (kx.optim.layer_decay, kx.model.drop_path_rate) == (0.95, 0.2)
        assert (kx.aug.mixup, kx.aug.cutmix, kx.aug.smoothing) == (0.0, 0.0, 0.1)
        assert (kx.data.test_clips, kx.data.test_crops, kx.train.batch_size * kx.train.accum_steps) == (
            4,
            3,
            4,
        )


def test_bad_values_fail_before_any_work(tmp_path, capsys):
    assert main(["video", "train", f"train.output_dir={tmp_path}", "data.decoder=decord"]) == 2
    assert "data.decoder must be one of" in capsys.readouterr().err
    assert main(["video", "train", f"train.output_dir={tmp_path}", "model.num_frame=8"]) == 2
    assert "model.num_frames" in capsys.readouterr().err
    assert main(["video", "eval", f"train.output_dir={tmp_path}"]) == 2
    assert "no model to evaluate" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_train_then_eval_end_to_end(tmp_path):
    out = tmp_path / "run"
    common = [
        f"train.output_dir={out}",
        "model.num_frames=2",
        "data.train.num_samples=8",
        "data.val.num_samples=6",
        "train.batch_size=4",
        "train.epochs=1",
        "train.num_workers=0",
        "train.progress=false",
        "train.tensorboard=false",
    ]
    assert main(["video", "train", *common]) == 0
    model = load(out / "final")
    assert model.weights_config["kind"] == "video" and len(model.weights_config["classes"]) == 8
    assert model.pos_embed.shape == (1, 1 + 64, 96)  # 2 frames in one tubelet of 2
    summary = json.loads((out / "result.json").read_text())
    assert summary["final"]["step"] == 2  # 8 clips / batch 4
    saved = load_config(VideoConfig, out / "config.yaml")  # the run folder's resolved config
    assert (saved.model.num_frames, saved.train.batch_size, saved.data.train.num_samples) == (2, 4, 8)
    assert main(["video", "eval", *common, "data.test_clips=3", "data.test_crops=1"]) == 0
    record = json.loads((out / "eval.json").read_text())
    report = {**record["metrics"], **record["facts"], **record["details"]}
    assert (report["videos"], report["views"], report["crops"], report["skipped_videos"]) == (6, 3, 1, 0)
    assert 0 <= report["top1"] <= report["top5"] <= 100


@pytest.mark.slow
def test_demo_stage_trains_random_and_eva_inits_on_the_same_clips(tmp_path, monkeypatch, caplog):
    import logging

    from flyeva.models.eva import build_encoder, get_size
    from flyeva.models.weights import save_weights
    from flyeva.tasks.video import demo

    tiny = ["data.train.num_samples=8", "data.val.num_samples=6", "train.epochs=1", "train.batch_size=4"]
    monkeypatch.setattr(demo, "QUICK_OVERRIDES", [*tiny, "model.num_frames=2"])
    encoder = build_encoder(get_size("miniature"))
    save_weights(encoder, tmp_path / "mim", kind="encoder", arch={"size": get_size("miniature").__dict__})
    data = demo.write_demo_clips(tmp_path / "clips", quick=True)
    assert data["chance_top1"] == 12.5  # 8 motions
    with caplog.at_level(logging.INFO, logger="flyeva.tasks.video.build"):
        for name, init in (("random", None), ("eva", str(tmp_path / "mim"))):
            result = demo.run_demo_stage(tmp_path / name, init, 0, data=data, quick=True)
            assert set(result) == {"top1", "mean_class_top1"}
            assert all(0 <= value <= 100 for value in result.values())
    assert (tmp_path / "eva" / "final" / "model.safetensors").is_file()
    # From scratch every tensor is new; inflated, every encoder tensor loads (its final norm as fc_norm),
    # 4 blocks x 13 + cls, pos, patch kernel and bias, fc_norm's 2 = 58, and the head is new.
    loaded = [r.getMessage() for r in caplog.records if "tensors loaded" in r.getMessage()]
    assert loaded == [
        "model.init='': 0 tensors loaded, 60 start fresh",
        f"model.init={tmp_path / 'mim'}: 58 tensors loaded, 2 start fresh ['head.weight', 'head.bias']",
    ]


def test_the_engine_counts_clips_not_the_first_tensor_of_the_batch():
    from flyeva.engine.loop import _sample_key

    # A batch whose first tensor is not one row per sample: 5 mask rows, 3 labels, 3 clips.
    batch = {"mask": torch.zeros(5), "labels": torch.zeros(3), "clips": torch.zeros(3, 8, 3, 4, 4)}
    objective = VideoObjective.__new__(VideoObjective)  # input_key is a class attribute
    assert _sample_key(objective, batch) == "clips" and len(batch[_sample_key(objective, batch)]) == 3
    from flyeva.engine.stage import as_objective

    plain = as_objective(lambda model, batch, ctx: None)  # a plain function counts "images"
    assert _sample_key(plain, {"images": torch.zeros(2), "labels": torch.zeros(2)}) == "images"
