"""Recipes as deltas on a named base, mask.ratio, and keys a stage would ignore."""

import pytest

from flyeva.cli import main
from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.data.masking import BlockMaskGenerator
from flyeva.pretrain.config import MaskSection, PretrainConfig
from flyeva.pretrain.run import masked_patches


def test_a_recipe_on_a_base_resolves_to_the_base_plus_its_delta(tmp_path):
    giant = load_config(PretrainConfig, recipe_path("pretrain", "eva_giant"))
    base = load_config(PretrainConfig, recipe_path("pretrain", "eva_base"))
    assert (base.model.size, base.train.precision, base.train.strategy) == ("eva_base", "bf16", "ddp")
    assert base.data == giant.data and base.optim == giant.optim and base.mask == giant.mask
    assert len(recipe_path("pretrain", "eva_base").read_text().splitlines()) <= 10
    child = tmp_path / "child.yaml"
    child.write_text("base: eva_large\ntrain: {epochs: 2}\n")
    (tmp_path / "eva_large.yaml").write_text(
        recipe_path("pretrain", "eva_large")
        .read_text()
        .replace("base: eva_giant", f"base: {recipe_path('pretrain', 'eva_giant')}")
    )
    resolved = load_config(PretrainConfig, child, ["optim.lr=2e-3"])
    assert (resolved.model.size, resolved.train.epochs, resolved.optim.lr) == ("eva_large", 2, 2e-3)
    assert resolved.data.samples_per_epoch == giant.data.samples_per_epoch  # from the grandparent
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop\n")
    with pytest.raises(ConfigError, match="makes a cycle"):
        load_config(PretrainConfig, loop)


def test_mask_ratio_is_resolved_against_the_grid():
    assert masked_patches(MaskSection(ratio=0.41), 16) == 105  # the paper's 105 of 256
    assert masked_patches(MaskSection(ratio=0.41), 8) == 26  # the miniature's 8x8 grid
    assert masked_patches(MaskSection(num_masking_patches=30), 8) == 30  # ratio 0: the absolute count
    generator = BlockMaskGenerator(
        grid=(16, 16), num_masking_patches=masked_patches(MaskSection(ratio=0.41), 16)
    )
    assert generator.num_masking_patches == 105


def test_a_key_the_linear_probe_would_ignore_is_rejected(tmp_path, capsys):
    args = ["classify", "linprobe", f"train.output_dir={tmp_path}", "optim.layer_decay=0.75"]
    assert main(args) == 2
    assert "optim.layer_decay=0.75 does not apply to a linear probe" in capsys.readouterr().err


def test_a_key_clip_would_ignore_names_the_key_that_applies(tmp_path, capsys):
    args = ["clip", "train", f"train.output_dir={tmp_path}", "optim.layer_decay=0.9"]
    assert main(args) == 2
    assert "set model.vision.layer_decay and/or model.text.layer_decay instead" in capsys.readouterr().err
