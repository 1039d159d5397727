"""The MIM objective against hand computations, and `flyeva pretrain` end to end on small data."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_encoder
from PIL import Image

from flyeva.cli import main as cli
from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.data.masking import BlockMaskGenerator
from flyeva.engine.stage import run_stage
from flyeva.pretrain import PRETRAIN
from flyeva.pretrain.config import PretrainConfig
from flyeva.pretrain.objective import MIMObjective, mim_loss, pixel_targets
from flyeva.teachers import has_native_bf16


def test_loss_is_negative_cosine_over_masked_tokens_by_hand():
    predicted = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0]])
    # cosines: 1, 1/sqrt(2), -1
    expected = -(1 + 1 / math.sqrt(2) - 1) / 3
    assert mim_loss(predicted, target).item() == pytest.approx(expected, abs=1e-7)
    assert mim_loss(predicted.half(), target.half()).dtype == torch.float32


class EchoStudent(torch.nn.Module):
    """Predicts, at each masked token, the token index and the image index (to check the gathering)."""

    def forward(self, images, mask):
        batch, tokens = mask.shape
        grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(tokens), indexing="ij"), -1)
        return grid[mask].float() + 1.0


class IndexTeacher(torch.nn.Module):
    def forward(self, images):
        batch = images.shape[0]
        grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(16), indexing="ij"), -1)
        return grid.float() + 1.0


def test_objective_regresses_the_teacher_at_masked_positions_only():
    generator = BlockMaskGenerator(grid=(4, 4), num_masking_patches=6, min_num_patches=2)
    objective = MIMObjective(IndexTeacher(), generator, patch_size=8)
    ctx = SimpleNamespace(seed=0, epoch=0, step=3, micro=0, rank=0)
    images = torch.zeros(5, 3, 32, 32)
    loss, metrics = objective(EchoStudent(), {"images": images}, ctx)
    # The student echoes exactly the teacher's features at the masked positions: cosine 1 everywhere.
    assert loss.item() == pytest.approx(-1.0, abs=1e-6)
    assert 0 < metrics["masked_fraction"] <= 6 / 16
    # The same (seed, epoch, step, micro, rank) gives the same masks; another step another.
    again, _ = objective(EchoStudent(), {"images": images}, ctx)
    assert again.item() == loss.item()
    validation = objective.validation_loss(EchoStudent(), images)
    assert validation.item() == pytest.approx(-1.0, abs=1e-6)


def test_validation_mask_is_every_other_token():
    seen = {}

    class Recorder(EchoStudent):
        def forward(self, images, mask):
            seen["mask"] = mask
            return super().forward(images, mask)

    objective = MIMObjective(
        IndexTeacher(), BlockMaskGenerator(grid=(4, 4), num_masking_patches=6, min_num_patches=2), 8
    )
    objective.validation_loss(Recorder(), torch.zeros(2, 3, 32, 32))
    assert seen["mask"].tolist() == [[i % 2 == 0 for i in range(16)]] * 2


def test_pixel_targets_are_per_patch_normalised_pixels():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    targets = pixel_targets(images, patch_size=2)
    assert targets.shape == (2, 4, 12)
    patch = images[0, :, 0:2, 0:2].reshape(-1)  # unfold order: channel, row, column
    expected = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
    assert torch.allclose(targets[0, 0], expected, atol=1e-6)


def write_images(folder, count, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        color = (index * 7 % 255, index * 13 % 255, index * 29 % 255)
        Image.new("RGB", size, color).save(folder / f"img_{index:03d}.png")


SMALL = [
    "model.size=miniature",
    "model.drop_path_rate=0.0",
    "teacher.random_init={image_size: 32, patch_size: 4, width: 32, layers: 1, heads: 2, mlp_ratio: 2.0,"
    " output_dim: 16}",
    "mask.num_masking_patches=26",
    "mask.min_num_patches=4",
    "train.epochs=1",
    "train.batch_size=8",
    "train.precision=fp32",
    "train.strategy=ddp",
    "train.device=cpu",
    "train.num_workers=0",
    "train.tensorboard=false",
    "train.progress=false",
    "train.log_every=1",
    "optim.warmup_epochs=0",
]


def test_a_folder_with_corrupt_files_trains_through_and_reports_the_exact_count(tmp_path, capsys):
    data = tmp_path / "images"
    write_images(data / "nested", 21)
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    good = (data / "nested" / "img_000.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    overrides = [*SMALL, f"data.sources=[{{type: folder, path: {data}}}]", f"train.output_dir={tmp_path}/run"]
    cfg = load_config(PretrainConfig, None, overrides)
    result = run_stage(PRETRAIN, cfg)
    assert result["step"] == 3  # 24 files / batch 8
    assert result["counts"] == {"skipped_samples": 3, "nonfinite_steps": 0}
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == result
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert next(r for r in epochs if r["kind"] == "epoch") | {"time": 0} == {
        "kind": "epoch",
        "step": 3,
        "time": 0,
        "images": 21,
        "skipped_images": 3,
    }
    assert "epoch 0: 21 images, 3 unreadable images skipped" in capsys.readouterr().out
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    # teacher.precision=auto is recorded as what ran: bf16 on a CPU with native bf16, else fp32.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["teacher"]["precision"] == ("bf16" if has_native_bf16(torch.device("cpu")) else "fp32")
    assert cfg.teacher.precision == "auto"  # the caller's config is left as it was


def test_teacher_grid_must_match_the_student(tmp_path):
    overrides = [
        *SMALL,
        "teacher.random_init.patch_size=8",
        f"train.output_dir={tmp_path}",
        "data.sources=[{type: synthetic, num_samples: 8}]",
    ]
    with pytest.raises(ValueError, match="grid"):
        run_stage(PRETRAIN, load_config(PretrainConfig, None, overrides))


def test_missing_teacher_and_missing_data_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        run_stage(PRETRAIN, load_config(PretrainConfig, None, [f"train.output_dir={tmp_path}"]))
    cfg = load_config(PretrainConfig, None, ["data.sources=[{type: synthetic, num_samples: 8}]"])
    with pytest.raises(ValueError, match=r"teacher\.path"):
        run_stage(PRETRAIN, cfg)


def test_recipes_resolve_and_the_giant_one_is_the_paper(capsys):
    giant = load_config(PretrainConfig, recipe_path("pretrain", "eva_giant"))
    assert (giant.model.size, giant.mask.num_masking_patches, giant.mask.min_num_patches) == (
        "eva_giant",
        105,
        16,
    )
    assert (giant.optim.lr, giant.optim.min_lr, giant.optim.betas, giant.optim.eps) == (
        1e-3,
        1e-5,
        [0.9, 0.98],
        1e-6,
    )
    assert (giant.optim.weight_decay, giant.optim.warmup_epochs, giant.optim.clip_grad) == (0.05, 2, 3.0)
    assert (giant.train.epochs, giant.train.batch_size, giant.train.precision, giant.train.strategy) == (
        150,
        32,
        "fp16",
        "zero1",
    )
    assert len(giant.data.sources) == 6 and giant.data.scale == [0.2, 1.0]
    for name in ("eva_large", "eva_base", "miniature"):
        load_config(PretrainConfig, recipe_path("pretrain", name))
    assert cli(["pretrain", "--print-config", "optim.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert cli(["pretrain", "optim.layer_decy=0.9"]) == 2
    assert "did you mean 'optim.layer_decay'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"recipes: \['eva_base'"):
        recipe_path("pretrain", "eva_huge")


def test_init_from_saved_weights_moves_every_encoder_weight(tmp_path):
    from safetensors.torch import load_file

    from flyeva.models import build_mim_model, save_flyeva

    torch.manual_seed(1)
    source = build_mim_model("miniature", teacher_dim=8)  # another head size: only the encoder is taken
    save_flyeva(source, tmp_path / "init")
    overrides = [
        *SMALL,
        f"model.init={tmp_path / 'init'}",
        "optim.lr=0.0",
        "optim.min_lr=0.0",
        "data.sources=[{type: synthetic, num_samples: 8}]",
        f"train.output_dir={tmp_path}/run",
    ]
    run_stage(PRETRAIN, load_config(PretrainConfig, None, overrides))
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for key, value in source.state_dict().items():
        if key not in ("mask_token", "lm_head.weight", "lm_head.bias"):
            assert torch.equal(final[key], value), key  # lr 0: the initial weights come through unchanged
    assert final["lm_head.weight"].shape == (16, 96)


def test_pixel_target_baseline_trains_without_a_teacher(tmp_path):
    overrides = [
        *SMALL,
        "mask.target=pixels",
        "teacher.random_init={}",
        f"train.output_dir={tmp_path}",
        "data.sources=[{type: synthetic, num_samples: 16}]",
    ]
    result = run_stage(PRETRAIN, load_config(PretrainConfig, None, overrides))
    assert result["step"] == 2
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["arch"]["teacher_dim"] == 3 * 4 * 4  # normalised pixels of a 4x4 patch


class PatchTeacher(torch.nn.Module):
    """A fixed random projection of each 4x4 patch: [B, N, 8] features that differ per patch."""

    def __init__(self):
        super().__init__()
        self.projection = torch.nn.Linear(3 * 4 * 4, 8)

    def forward(self, images):
        return self.projection(torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2))


def test_distillation_masks_nothing_and_scores_every_patch_by_hand():
    from flyeva.models import build_mim_model

    torch.manual_seed(0)
    model = build_mim_model(tiny_encoder(16), teacher_dim=8, drop_path_rate=0.0).eval()
    with torch.no_grad():
        model.mask_token.fill_(100.0)  # a masked position would change every number below
    teacher, images = PatchTeacher(), torch.randn(3, 3, 16, 16)
    objective = MIMObjective(teacher, None, patch_size=4)
    ctx = SimpleNamespace(seed=0, epoch=0, step=0, micro=0, rank=0)
    loss, metrics = objective(model, {"images": images}, ctx)
    assert metrics == {"masked_fraction": 0.0}
    # By hand: the unmasked encoder's 16 patch tokens per image, the head, the cosine per patch.
    with torch.no_grad():
        tokens = model.forward_features(images)[:, 1:]
        predicted, target = model.lm_head(tokens), teacher(images)
        assert predicted.shape == target.shape == (3, 16, 8)
        cosines = [
            predicted[b, n] @ target[b, n] / (predicted[b, n].norm() * target[b, n].norm())
            for b in range(3)
            for n in range(16)
        ]
        expected = -sum(cosines) / 48
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
        assert model(images, None).shape == (48, 8)
        assert objective.validation_loss(model, images).item() == pytest.approx(expected.item(), abs=1e-6)
        # The same student scored as MIM (26% masked) sees mask tokens: another loss.
        masked = MIMObjective(teacher, BlockMaskGenerator((4, 4), 6, min_num_patches=2), 4)
        assert abs(masked(model, {"images": images}, ctx)[0].item() - expected.item()) > 1e-3


def test_distillation_target_trains_from_the_teacher_and_bad_targets_are_refused(tmp_path, capsys):
    overrides = [
        *SMALL,
        "mask.target=distill",
        f"train.output_dir={tmp_path}",
        "data.sources=[{type: synthetic, num_samples: 16}]",
    ]
    result = run_stage(PRETRAIN, load_config(PretrainConfig, None, overrides))
    assert result["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "train"]
    assert steps and all(r["masked_fraction"] == 0.0 and math.isfinite(r["loss"]) for r in steps)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["arch"]["teacher_dim"] == 16  # the teacher's width, as for mask.target=clip
    assert cli(["pretrain", "mask.target=distil"]) == 2
    assert "mask.target must be one of ['clip', 'pixels', 'distill'], got 'distil'" in capsys.readouterr().err
