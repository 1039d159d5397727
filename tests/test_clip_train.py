"""`flyeva clip train` and `flyeva clip zeroshot` end to end, through the CLI, on a tiny caption folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from flyeva.cli import main
from flyeva.data.transforms import EvalTransform
from flyeva.engine import loop
from flyeva.engine.optim import OptimConfig, lr_at
from flyeva.models.checkpoint import load_any
from flyeva.tasks.clip.model import load_clip
from flyeva.tasks.clip.zeroshot import build_classifier

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
STEPS_PER_EPOCH, EPOCHS, WARMUP_STEPS = 4, 2, 2  # 14 samples in batches of 4; warmup 0.5 epochs
PEAK_LR, MIN_LR = 2e-3, 1e-5  # optim.lr below; the miniature recipe's min_lr


def square(colour: tuple[int, int, int], offset: int) -> Image.Image:
    pixels = np.full((32, 32, 3), 128, dtype=np.uint8)
    pixels[offset : offset + 12, offset : offset + 12] = colour
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_data")
    pairs, classes = root / "pairs", root / "classes"
    pairs.mkdir()
    for index in range(12):
        name = list(COLOURS)[index % 2]
        square(COLOURS[name], 2 + index).save(pairs / f"{index:02d}.png")
        (pairs / f"{index:02d}.txt").write_text(f"a {name} square\n")
        (classes / name).mkdir(parents=True, exist_ok=True)
        square(COLOURS[name], 2 + index).save(classes / name / f"{index:02d}.png")
    (pairs / "12.png").write_bytes(b"not an image")  # a bad pair: unreadable image
    (pairs / "12.txt").write_text("a broken square\n")
    square(COLOURS["red"], 3).save(pairs / "13.png")  # a bad pair: no caption
    return root


def overrides(data, out) -> list[str]:
    return [
        f"train.output_dir={out}",
        f"data.sources=[{{type: caption_folder, path: {data / 'pairs'}}}]",
        "model.embed_dim=24",
        "model.vision.size=miniature",
        "model.vision.lr=4e-3",  # 2 x optim.lr
        "model.vision.layer_decay=0.8",
        "model.text.width=32",
        "model.text.heads=2",
        "model.text.layers=2",
        "model.text.context_length=16",
        "model.text.lr=1e-3",  # 0.5 x optim.lr
        "loss.micro_batch_size=2",
        f"zeroshot.datasets=[{{name: colours, type: folder, path: {data / 'classes'}}}]",
        "zeroshot.templates=['a {} square']",
        "zeroshot.during_training=true",
        "zeroshot.num_workers=0",
        "optim.lr=2e-3",
        "optim.warmup_epochs=0.5",
        f"train.epochs={EPOCHS}",
        "train.batch_size=4",
        "train.num_workers=0",
        "train.device=cpu",
        "train.log_every=1",
        "train.tensorboard=false",
        "train.progress=false",
    ]


def expected_scale(name: str) -> float:
    """lr scale by hand: vision 2x with layer decay 0.8 over 4 blocks, text 0.5x, logit_scale 1x."""
    if name.startswith("visual."):
        part = name.removeprefix("visual.")
        layer = 0 if part.startswith(("cls_token", "pos_embed", "patch_embed")) else 5
        layer = int(part.split(".")[1]) + 1 if part.startswith("blocks.") else layer
        return 2.0 * 0.8 ** (5 - layer)
    return 0.5 if name.startswith("text.") else 1.0


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_run")
    seen_lrs, names = [], {}
    original_step, original_train = torch.optim.AdamW.step, loop.train

    def recording_step(self, *args, **kwargs):
        seen_lrs.append({names[id(p)]: group["lr"] for group in self.param_groups for p in group["params"]})
        return original_step(self, *args, **kwargs)

    def recording_train(model, *args, **kwargs):
        names.update({id(p): name for name, p in model.named_parameters()})
        return original_train(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", recording_step)
        patch.setattr(loop, "train", recording_train)
        assert main(["clip", "train", *overrides(data, out)]) == 0
    return out, seen_lrs, sorted(names.values())


def test_training_runs_every_step_and_counts_bad_pairs(trained):
    out = trained[0]
    summary = json.loads((out / "result.json").read_text())
    assert summary["step"] == STEPS_PER_EPOCH * EPOCHS
    # the unreadable image and the uncaptioned one, every epoch
    assert summary["counts"] == {"skipped_samples": 2 * EPOCHS, "nonfinite_steps": 0}
    assert 1.0 <= summary["facts"]["logit_scale"] <= 100.0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert len(losses) == STEPS_PER_EPOCH * EPOCHS and all(np.isfinite(losses))
    evals = [line for line in lines if line["kind"] == "eval"]
    assert len(evals) == EPOCHS and all(0.0 <= e["zeroshot_colours_top1"] <= 100.0 for e in evals)


def test_optimizer_sees_each_towers_lr_at_every_step(trained):
    _, seen_lrs, names = trained
    total = STEPS_PER_EPOCH * EPOCHS
    assert len(seen_lrs) == total
    assert "logit_scale" in names and "text.token_embedding.weight" in names
    for step, lrs in enumerate(seen_lrs):
        assert sorted(lrs) == names  # every parameter is in exactly one group
        schedule = OptimConfig(lr=PEAK_LR, min_lr=MIN_LR, warmup="linear_plus_one")
        base = lr_at(step, total, WARMUP_STEPS, schedule)
        for name, lr in lrs.items():
            assert lr == pytest.approx(base * expected_scale(name), rel=1e-12, abs=0), (step, name)


def test_final_weights_reload_as_clip_and_as_an_eva_encoder(trained):
    out = trained[0]
    model, section = load_clip(out / "final")
    assert section.embed_dim == 24
    encoder = load_any(out / "final" / "visual", kind="encoder")
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, model.visual.state_dict()[key]), key


def test_zeroshot_command_on_a_folder_matches_a_hand_evaluation(trained, data, tmp_path):
    out = trained[0]
    report = tmp_path / "zeroshot.json"
    argv = [
        "clip",
        "zeroshot",
        "--checkpoint",
        str(out / "final"),
        "--dataset",
        f"folder:{data / 'classes'}:colours",
    ]
    argv += ["--retrieval", str(data / "pairs"), "--json", str(report), "zeroshot.templates=['a {} square']"]
    assert main(argv) == 0
    results = json.loads(report.read_text())
    scores = results["datasets"]["colours"]
    assert (scores["images"], scores["classes"], scores["skipped"]) == (12, 2, 0)

    model, _ = load_clip(out / "final")
    model.eval()
    classifier = build_classifier(model, ["blue", "red"], ["a {} square"])
    transform = EvalTransform(32)
    correct = 0
    with torch.no_grad():
        for label, name in enumerate(["blue", "red"]):
            for path in sorted((data / "classes" / name).iterdir()):
                features = model.encode_image(
                    transform(Image.open(path).convert("RGB"))[None], normalize=True
                )
                correct += int((features @ classifier).argmax() == label)
    assert scores["top1"] == pytest.approx(100.0 * correct / 12)
    assert scores["top5"] == 100.0  # two classes
    retrieval = results["retrieval"]["retrieval_0"]
    assert (retrieval["images"], retrieval["captions"]) == (12, 12)  # bad pairs left out
    assert results["average_top1"] == pytest.approx(scores["top1"])


def test_unknown_key_and_missing_data_are_clean_errors(capsys):
    assert main(["clip", "train", "optim.lrr=1"]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert main(["clip", "zeroshot", "zeroshot.datasets=[]"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
