"""Classification transfer: fine-tuning (layer decay, final norm, freezing, mixup), probe, kNN, CLI."""

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_encoder
from engine_run import train
from PIL import Image
from safetensors.torch import load_file
from test_engine import ListStream
from timm.models.eva import Eva

from flyeva.cli import main
from flyeva.engine.loop import StepContext, TrainConfig
from flyeva.engine.optim import OptimConfig, layer_decay_groups
from flyeva.eval.classification import ClassificationObjective, Evaluator, confusion_summary
from flyeva.models.eva import build_encoder
from flyeva.tasks.classify.data import AugSection, TrainTransform
from flyeva.tasks.classify.knn import knn_classify
from flyeva.tasks.classify.lars import LARS
from flyeva.tasks.classify.model import (
    PretrainedWeights,
    build_classifier,
    classifier_from_pretrained,
    export_timm_classifier,
    freeze_patch_embed,
    load_pretrained,
)

TINY = tiny_encoder(16, depth=3)
PATTERNS = ("horizontal", "vertical", "checker", "diagonal")


def pattern_image(kind: str, rng: random.Random, size: int = 32) -> Image.Image:
    """Bright/dark stripes or checks of period 4 on the patch grid, random colours and noise.

    The class is the spatial pattern inside every 4x4 patch, so it survives mean pooling.
    """
    y, x = np.mgrid[:size, :size]
    on = {
        "horizontal": y % 4 < 2,
        "vertical": x % 4 < 2,
        "checker": (x // 2 + y // 2) % 2 == 0,
        "diagonal": (x + y) % 4 < 2,
    }[kind]
    bright = np.array([rng.randrange(150, 256) for _ in range(3)])
    dark = np.array([rng.randrange(0, 100) for _ in range(3)])
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(np.where(on[..., None], bright, dark) + noise, 0, 255).astype(np.uint8))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and far faster than two when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_pattern_folder(root, train, val, seed):
    """An ImageFolder tree root/{train,val}/<pattern>/<i>.png with `train` and `val` images per class."""
    rng = random.Random(seed)
    for split, count in (("train", train), ("val", val)):
        for kind in PATTERNS:
            (root / split / kind).mkdir(parents=True)
            for index in range(count):
                pattern_image(kind, rng).save(root / split / kind / f"{index}.png")
    return root


@pytest.fixture(scope="module")
def pattern_folder(tmp_path_factory):
    return write_pattern_folder(tmp_path_factory.mktemp("patterns"), train=48, val=16, seed=0)


def labeled_batches(count, batch=8, classes=5, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 3, size, size, generator=generator),
            torch.randint(0, classes, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def engine_config(tmp_path, **changes):
    base = dict(
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=8,
        precision="fp32",
        strategy="ddp",
        device="cpu",
        num_workers=0,
        resume="never",
        tensorboard=False,
        progress=False,
        log_every=1,
    )
    return TrainConfig(**{**base, **changes})


# ----- fine-tuning model: layer decay, final norm, freezing, resolution, export ---------------------


def test_every_group_gets_its_layer_decayed_lr_during_finetuning(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_classifier(TINY, 5, drop_path_rate=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    optim = OptimConfig(lr=1e-3, min_lr=1e-6, layer_decay=0.85, warmup_epochs=1, clip_grad=0.0)
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([(g["lr"], [names[id(p)] for p in g["params"]]) for g in self.param_groups])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train(
        model,
        ClassificationObjective(5, smoothing=0.1),
        ListStream(labeled_batches(4)),
        engine_config(tmp_path, epochs=2),
        optim,
        groups_fn=lambda m: layer_decay_groups(m, optim),
    )
    assert len(seen) == 8  # 4 steps x 2 epochs, warmup 4 steps
    depth = TINY.depth
    for step, groups in enumerate(seen):
        base = (
            1e-3 * step / 3  # the release's (BEiT) np.linspace(0, peak, 4) warmup
            if step < 4
            else 1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (step - 4) / 4))
        )
        for lr, group_names in groups:
            for name in group_names:
                if name.startswith(("cls_token", "pos_embed", "patch_embed")):
                    layer = 0  # docs/recipes.md §4: embeddings are layer 0
                elif name.startswith("blocks."):
                    layer = int(name.split(".")[1]) + 1
                else:
                    assert name.startswith(("fc_norm", "head")), name
                    layer = depth + 1
                assert lr == pytest.approx(base * 0.85 ** (depth + 1 - layer), rel=1e-12, abs=1e-18), name
    head_lr = next(lr for lr, group_names in seen[6] if "head.weight" in group_names)
    embed_lr = next(lr for lr, group_names in seen[6] if "patch_embed.proj.weight" in group_names)
    assert embed_lr / head_lr == pytest.approx(0.85**4)


def pretrained_weights(num_heads_classes=None):
    """Encoder weights with a recognisable final norm (weight 2 + i/100, bias -i/100)."""
    torch.manual_seed(1)
    encoder = build_encoder(TINY)
    state = encoder.state_dict()
    state["norm.weight"] = 2 + torch.arange(TINY.embed_dim) / 100
    state["norm.bias"] = -torch.arange(TINY.embed_dim) / 100
    head = None
    if num_heads_classes:
        head = {
            "head.weight": torch.randn(num_heads_classes, TINY.embed_dim),
            "head.bias": torch.randn(num_heads_classes),
        }
    return PretrainedWeights(state, TINY, head, source="ckpt"), encoder


def test_final_norm_options_put_the_checkpoint_norm_where_documented():
    weights, encoder = pretrained_weights()
    norm_weight, norm_bias = weights.encoder_state["norm.weight"], weights.encoder_state["norm.bias"]

    copied = classifier_from_pretrained(weights, 4, final_norm="fc_norm")
    assert isinstance(copied.norm, torch.nn.Identity)
    assert torch.equal(copied.fc_norm.weight, norm_weight) and torch.equal(copied.fc_norm.bias, norm_bias)

    dropped = classifier_from_pretrained(weights, 4, final_norm="drop")
    assert isinstance(dropped.norm, torch.nn.Identity)
    assert torch.equal(dropped.fc_norm.weight, torch.ones(TINY.embed_dim))
    assert torch.equal(dropped.fc_norm.bias, torch.zeros(TINY.embed_dim))

    kept = classifier_from_pretrained(weights, 4, final_norm="keep")
    assert isinstance(kept.fc_norm, torch.nn.Identity)
    assert torch.equal(kept.norm.weight, norm_weight)
    # Every other weight is the checkpoint's, in all three layouts.
    for model in (copied, dropped, kept):
        assert torch.equal(model.blocks[2].mlp.fc2.weight, weights.encoder_state["blocks.2.mlp.fc2.weight"])
        assert model.head.weight.abs().max() < 0.002 * 2.1  # head init scale 0.001 of trunc_normal(0.02)
        assert torch.equal(model.head.bias, torch.zeros(4))
    # keep: the pooled feature is the mean of the encoder's own normed patch tokens.
    encoder.load_state_dict(weights.encoder_state)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = encoder.forward_features(images)[:, 1:].mean(1)
        assert torch.allclose(
            kept.eval().forward_head(kept.forward_features(images), pre_logits=True), expected
        )
        tokens = copied.eval().forward_features(images)[:, 1:].mean(1)
        manual = torch.nn.functional.layer_norm(tokens, (TINY.embed_dim,), norm_weight, norm_bias, eps=1e-6)
        assert torch.allclose(
            copied.forward_head(copied.forward_features(images), pre_logits=True), manual, atol=1e-6
        )


def test_head_class_mismatch_is_one_clear_error_and_reset_head_fixes_it():
    weights, _ = pretrained_weights(num_heads_classes=3)
    with pytest.raises(ValueError) as error:
        classifier_from_pretrained(weights, 4)
    message = str(error.value)
    assert "3-class head" in message and "4 classes" in message and "model.reset_head=true" in message
    assert "\n" not in message
    reset = classifier_from_pretrained(weights, 4, reset_head=True)
    assert reset.head.weight.shape == (4, TINY.embed_dim) and reset.head.weight.abs().max() < 0.01
    reused = classifier_from_pretrained(weights, 3)
    assert torch.equal(reused.head.weight, weights.head_state["head.weight"])


def test_release_style_finetuned_checkpoint_keeps_fc_norm_and_head(tmp_path):
    torch.manual_seed(0)
    finetuned = build_classifier("miniature", 3)
    with torch.no_grad():
        finetuned.fc_norm.weight.add_(torch.arange(96) / 10)
    torch.save({"model": finetuned.state_dict()}, tmp_path / "finetuned.pth")  # the release's layout
    weights = load_pretrained(tmp_path / "finetuned.pth")
    assert weights.head_state["head.weight"].shape == (3, 96)
    assert torch.equal(weights.encoder_state["norm.weight"], finetuned.fc_norm.weight)
    with pytest.raises(ValueError, match="3-class head but the data has 5 classes"):
        classifier_from_pretrained(weights, 5)
    again = classifier_from_pretrained(weights, 3)  # fc_norm and head come back where they were
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.eval()(images), finetuned.eval()(images), atol=1e-6)


def test_resolution_change_interpolates_position_embeddings():
    weights, _ = pretrained_weights()
    model = classifier_from_pretrained(weights, 4, img_size=24)
    assert model.pos_embed.shape == (1, 1 + 6 * 6, TINY.embed_dim)
    assert torch.equal(model.pos_embed[:, 0], weights.encoder_state["pos_embed"][:, 0])  # CLS position kept
    assert model(torch.randn(2, 3, 24, 24)).shape == (2, 4)


@pytest.mark.parametrize("frozen", [False, True])
def test_patch_embedding_trains_unless_frozen(tmp_path, frozen):
    torch.manual_seed(0)
    model = build_classifier(TINY, 5)
    if frozen:
        freeze_patch_embed(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = OptimConfig(lr=1e-2, warmup_epochs=0, layer_decay=0.9, clip_grad=0.0)
    train(
        model,
        ClassificationObjective(5),
        ListStream(labeled_batches(3)),
        engine_config(tmp_path),
        optim,
        groups_fn=lambda m: layer_decay_groups(m, optim),
    )
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (not (frozen and name.startswith("patch_embed"))), name


def test_export_loads_strictly_into_timm_eva_with_global_pool_avg(tmp_path):
    torch.manual_seed(0)
    model = build_classifier(TINY, 7).eval()
    path, recipe = export_timm_classifier(model, tmp_path / "classifier.safetensors")
    assert "num_classes=7" in recipe and "global_pool='avg'" in recipe
    timm_model = Eva(
        img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0, num_classes=7
    )
    assert timm_model.global_pool == "avg"
    timm_model.load_state_dict(load_file(str(path)), strict=True)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(timm_model.eval()(images), model(images), atol=1e-6)


# ----- objective, augmentation, evaluation -------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Returns fixed logits and remembers what it was given."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.inputs = num_classes, []

    def forward(self, images):
        self.inputs.append(images.clone())
        return torch.zeros(len(images), self.num_classes, requires_grad=True)


def test_mixup_mixes_images_and_targets_with_the_same_lambda():
    objective = ClassificationObjective(5, smoothing=0.0, mixup=dict(mixup_alpha=0.8, cutmix_alpha=0.0))
    images = torch.randn(7, 3, 8, 8)  # odd: the last image is dropped, timm mixes mirrored pairs
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    captured = capture_targets(objective)
    model = Recorder(5)
    ctx = StepContext(epoch=0, step=3, micro=0, rank=0, seed=0, device=torch.device("cpu"))
    loss, _ = objective(model, {"images": images.clone(), "labels": labels}, ctx)
    targets, mixed = captured["targets"], model.inputs[0]
    assert targets.shape == (6, 5) and mixed.shape == (6, 3, 8, 8)
    assert torch.allclose(targets.sum(1), torch.ones(6))
    lam = targets[1, 1].item()  # image 1 (class 1) is mixed with its mirror, image 4 (class 4)
    assert 0 < lam <= 1 and targets[1, 4].item() == pytest.approx(1 - lam, abs=1e-6)
    assert torch.allclose(mixed, lam * images[:6] + (1 - lam) * images[:6].flip(0), atol=1e-5)
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)  # uniform logits
    # The same step mixes the same way (resume), another step differently.
    again = Recorder(5)
    objective(again, {"images": images.clone(), "labels": labels}, ctx)
    assert torch.equal(again.inputs[0], mixed)
    other = Recorder(5)
    objective(
        other, {"images": images.clone(), "labels": labels}, StepContext(0, 4, 0, 0, 0, torch.device("cpu"))
    )
    assert not torch.equal(other.inputs[0], mixed)


def capture_targets(objective):
    captured = {}
    original = objective.criterion.forward

    def capture(logits, targets):
        captured["targets"] = targets
        return original(logits, targets)

    objective.criterion.forward = capture
    return captured


def test_cutmix_targets_are_area_weighted_with_smoothing():
    objective = ClassificationObjective(4, smoothing=0.1, mixup=dict(mixup_alpha=0.0, cutmix_alpha=1.0))
    captured = capture_targets(objective)
    model = Recorder(4)
    images = torch.zeros(2, 3, 16, 16)
    images[1] = 1.0
    ctx = StepContext(0, 0, 0, 0, 0, torch.device("cpu"))
    objective(model, {"images": images, "labels": torch.tensor([0, 3])}, ctx)
    lam = 1 - model.inputs[0][0].mean().item()  # image 0 is zeros with a pasted box of ones
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4
    expected = torch.tensor([lam * on + (1 - lam) * off, off, off, lam * off + (1 - lam) * on])
    assert 0 < lam < 1
    assert torch.allclose(captured["targets"][0], expected, atol=1e-6)


def test_train_transform_is_reproducible_and_leaves_global_rngs_alone():
    transform = TrainTransform(16, AugSection(reprob=0.25))  # RandAugment m9 + random erasing
    image = pattern_image("checker", random.Random(0))
    random.seed(5)
    python_before = random.random()
    random.seed(5)
    torch.manual_seed(3)
    first = transform(image)
    assert random.random() == python_before  # Python's RNG untouched
    torch.manual_seed(3)
    assert torch.equal(transform(image), first)
    torch.manual_seed(4)
    assert not torch.equal(transform(image), first)
    assert first.shape == (3, 16, 16)


class FixedLogits(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, images):
        return self.logits[images[:, 0, 0, 0].long()]  # image i carries its row index


def test_evaluator_top1_top5_loss_and_confusion_by_hand():
    logits = torch.tensor(
        [
            [5.0, 1, 0, 0, 0, 0],  # label 0: top-1 hit
            [0.0, 1, 5, 0, 0, 0],  # label 1: predicted 2, label is 2nd best -> top-5 hit
            [9.0, 8, 7, 6, 5, 0],  # label 5: worst -> neither
            [0.0, 0, 0, 3, 0, 0],  # label 3: hit
        ]
    )
    labels = torch.tensor([0, 1, 5, 3])
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    stream = ListStream([(images[:3], labels[:3]), (images[3:], labels[3:])])
    evaluator = Evaluator(stream, num_classes=6)
    metrics = evaluator(FixedLogits(logits), StepContext(0, 0, 0, 0, 0, torch.device("cpu")))
    expected_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    assert metrics["top1"] == 50.0 and metrics["top5"] == 75.0
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    summary = confusion_summary(evaluator.confusion, ["a", "b", "c", "d", "e", "f"])
    assert summary["per_class_top1"] == {"a": 100.0, "b": 0.0, "c": None, "d": 100.0, "e": None, "f": 0.0}
    assert summary["most_confused"] == [
        {"true": "b", "predicted": "c", "count": 1},
        {"true": "f", "predicted": "a", "count": 1},
    ]


# ----- LARS and kNN ----------------------------------------------------------------------------------------


def test_lars_step_matches_the_formula_by_hand():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    weight.grad, bias.grad = torch.tensor([[0.7, -0.4]]), torch.tensor([2.0])
    optimizer.step()
    update = torch.tensor([[0.7 + 0.3, -0.4 + 0.4]])  # g + wd * w = [1.0, 0.0], |.| = 1
    assert torch.allclose(weight, torch.tensor([[3.0, 4.0]]) - 0.5 * 0.001 * 5 / 1.0 * update)
    assert torch.allclose(bias, torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: no decay, no trust ratio
    weight.grad, bias.grad = torch.zeros(1, 2), torch.tensor([0.0])
    optimizer.step()  # zero gradient: momentum alone moves the bias
    assert torch.allclose(bias, torch.tensor([0.0 - 0.5 * 0.9 * 2.0]))


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    hits1 = hits5 = 0
    for query, label in zip(test_x.tolist(), test_y.tolist()):
        q = np.array(query) / np.linalg.norm(query)
        sims = [float(q @ (np.array(t) / np.linalg.norm(t))) for t in train_x.tolist()]
        nearest = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in nearest:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        ranked = sorted(range(num_classes), key=lambda c: -votes[c])
        hits1 += ranked[0] == label
        hits5 += label in ranked[:5]
    return 100 * hits1 / len(test_y), 100 * hits5 / len(test_y)


def test_knn_matches_brute_force_and_a_hand_example():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 8, generator=generator), torch.randn(25, 8, generator=generator)
    train_y, test_y = (
        torch.randint(0, 7, (60,), generator=generator),
        torch.randint(0, 7, (25,), generator=generator),
    )
    result = knn_classify(
        train_x, train_y, test_x, test_y, k=20, temperature=0.07, num_classes=7, chunk_size=10
    )
    top1, top5 = brute_force_knn(train_x, train_y, test_x, test_y, 20, 0.07, 7)
    assert (result["top1"], result["top5"]) == (top1, top5)
    # By hand: the query equals A (cos 1, class 1); B and C (class 0) have cos 0.8455 and 0.9044.
    # k=1: class 1. k=3, T=1: class 0 wins, e^0.8455 + e^0.9044 = 4.80 > e^1 = 2.72. k=3, T=0.07:
    # class 1 wins again, e^14.29 = 1.6e6 > e^12.08 + e^12.92 = 5.9e5.
    train_x = torch.tensor([[1.0, 0.1], [1.0, -0.5], [1.0, 0.6]])
    train_y = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.1]])

    def predicted(k, temperature):
        hits = {
            c: knn_classify(train_x, train_y, query, torch.tensor([c]), k=k, temperature=temperature)["top1"]
            for c in (0, 1)
        }
        return max(hits, key=hits.get)

    assert (predicted(1, 1.0), predicted(3, 1.0), predicted(3, 0.07)) == (1, 0, 1)


# ----- end to end, through the CLI ------------------------------------------------------------------------


def test_cli_print_config_shows_the_documented_defaults(capsys):
    assert main(["classify", "finetune", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "final_norm: fc_norm" in text and "freeze_patch_embed: false" in text
    assert main(["classify", "linprobe", "--print-config", "--config", "eva_giant_clip_linprobe"]) == 0
    text = capsys.readouterr().out
    assert "optimizer: lars" in text and "lr: 1.0" in text


def test_finetune_learns_a_separable_folder_through_the_cli(pattern_folder, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = [
        f"data.root={pattern_folder}",
        f"train.output_dir={out}",
        "train.epochs=3",
        "train.batch_size=32",
        "train.num_workers=0",
        "train.progress=false",
        "train.tensorboard=false",
        "train.ema_decay=0.9",
        "optim.warmup_epochs=0.5",
        "aug.scale=[1.0,1.0]",  # keep the pattern on the patch grid
        "aug.ratio=[1.0,1.0]",
        "model.final_norm=drop",
    ]
    assert main(["classify", "finetune", *overrides]) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["facts"]["num_classes"] == 4 and len(summary["evaluations"]) == 3
    assert summary["final"]["top1"] >= 90.0, summary["evaluations"]
    assert summary["best"]["top1"] >= summary["final"]["top1"]
    assert [e["epoch"] for e in summary["evaluations"]] == [0, 1, 2]
    assert set(summary["evaluations"][-1]) >= {"top1", "top5", "loss", "ema_top1", "ema_top5", "ema_loss"}
    assert summary["details"]["confusion"]["per_class_top1"].keys() == set(PATTERNS)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["kind"] == "classifier" and config["classes"] == sorted(PATTERNS)
    assert (out / "final_ema" / "model.safetensors").is_file()
    assert (
        main(["classify", "export-timm", str(out / "final"), "--out", str(tmp_path / "timm.safetensors")])
        == 0
    )
    timm_model = Eva(**config["arch"]["timm_kwargs"])
    timm_model.load_state_dict(load_file(str(tmp_path / "timm.safetensors")), strict=True)
    # Its encoder serves the frozen-feature evaluations too.
    knn = ["classify", "knn", f"model.init={out / 'final'}", f"data.root={pattern_folder}", "knn.k=5"]
    assert main([*knn, f"train.output_dir={tmp_path / 'knn'}", "train.num_workers=0"]) == 0
    assert json.loads((tmp_path / "knn" / "result.json").read_text())["metrics"]["top1"] >= 90.0
    # Its 4-class head cannot silently start a 3-class run.
    three = tmp_path / "three"
    for split in ("train", "val"):
        for kind in PATTERNS[:3]:
            (three / split / kind).mkdir(parents=True)
            pattern_image(kind, random.Random(0)).save(three / split / kind / "0.png")
    assert main(["classify", "finetune", f"model.init={out / 'final'}", f"data.root={three}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "4-class head but the data has 3 classes" in error and "model.reset_head=true" in error


def test_missing_val_folder_and_empty_class_are_one_line_errors(tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)
    pattern_image("vertical", rng).save(tmp_path / "data" / "train" / "a" / "0.png")
    assert main(["classify", "finetune", f"data.root={tmp_path / 'data'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "no validation folder" in error and "data.val=[]" in error and "\n" not in error
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    (tmp_path / "data" / "train" / "b").mkdir()
    assert main(["classify", "finetune", f"data.root={tmp_path / 'data'}"]) == 2
    error = capsys.readouterr().err.strip()
    assert "hold no images" in error and "\n" not in error


def test_a_run_from_scratch_names_the_settings_made_for_pretrained_encoders():
    from flyeva.config import load_config, recipe_path
    from flyeva.tasks.classify.finetune import FinetuneConfig, from_scratch_warning

    # The schema's defaults are the release's IN-1K stage: all three are on.
    line = from_scratch_warning(FinetuneConfig())
    assert line.startswith("model.init is empty: the classifier starts from random weights")
    assert "start: model.head_init_scale=0.001, optim.layer_decay=0.95, train.ema_decay=0.9999;" in line
    assert "--config miniature" in line and "\n" not in line
    # The miniature recipe is the from-scratch one: nothing to name.
    miniature = load_config(FinetuneConfig, recipe_path("classify", "miniature"))
    assert from_scratch_warning(miniature) == (
        "model.init is empty: the classifier starts from random weights (a from-scratch baseline)"
    )
    one = load_config(FinetuneConfig, recipe_path("classify", "miniature"), ["optim.layer_decay=0.85"])
    assert "from-scratch start: optim.layer_decay=0.85; --config miniature" in from_scratch_warning(one)
