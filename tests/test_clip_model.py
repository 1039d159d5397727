"""EVA-CLIP's model: tower initialisation from EVA / open_clip files, optimiser groups, save/load."""

import json
import logging

import open_clip
import pytest
import torch
from clip_dist_worker import tiny_clip
from safetensors.torch import save_file

from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.engine.optim import OptimConfig, apply_lr, build_adamw
from flyeva.models import weights
from flyeva.models.checkpoint import CheckpointError, save_flyeva
from flyeva.models.eva import EvaSize, build_mim_model
from flyeva.tasks.clip.config import ClipConfig, check_config
from flyeva.tasks.clip.init_weights import load_text_init, load_vision_init
from flyeva.tasks.clip.model import (
    ClipModelSection,
    EvaClip,
    TextSection,
    VisionSection,
    arch_dict,
    clip_param_groups,
    is_clip_folder,
    load_clip,
    save_clip,
)
from flyeva.tasks.clip.zeroshot import tokenizer_for
from flyeva.teachers.eva_tower import is_eva_clip_folder, load_eva_clip_teacher

TINY_TEXT = dict(width=32, heads=2, layers=2, context_length=16, quick_gelu=True)


def tiny_section(**vision) -> ClipModelSection:
    return ClipModelSection(
        embed_dim=24, vision=VisionSection(size="miniature", **vision), text=TextSection(**TINY_TEXT)
    )


def test_mim_checkpoint_fills_every_encoder_weight_and_drops_mim_parts(tmp_path, caplog):
    torch.manual_seed(0)
    mim = build_mim_model("miniature", teacher_dim=48)
    with torch.no_grad():  # as after training: no weight left at a value an init could produce
        for param in mim.parameters():
            param.add_(torch.randn_like(param))
    save_flyeva(mim, tmp_path / "mim")
    fresh = tiny_clip().visual.state_dict()
    model = tiny_clip()
    with caplog.at_level(logging.INFO, logger="flyeva.tasks.clip.init_weights"):
        load_vision_init(model.visual, tmp_path / "mim")
    loaded = model.visual.state_dict()
    saved = mim.state_dict()
    encoder_keys = [k for k in loaded if not k.startswith("head.")]
    assert len(encoder_keys) == len(saved) - 3  # all but mask_token, lm_head.weight, lm_head.bias
    for key in encoder_keys:
        assert torch.equal(loaded[key], saved[key]), key
        assert not torch.equal(loaded[key], fresh[key]), f"{key} still at its initial value"
    assert torch.equal(loaded["head.weight"], fresh["head.weight"])  # the CLIP projection starts fresh
    notes = " ".join(r.getMessage() for r in caplog.records)
    assert "mask_token" in notes and "lm_head.weight" in notes and "dropped" in notes


def test_vision_init_of_another_size_names_the_mismatch(tmp_path):
    narrow = EvaSize(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, mlp_dim=192)
    save_flyeva(build_mim_model(narrow, teacher_dim=48), tmp_path / "mim")
    with pytest.raises(CheckpointError, match=r"mis-shaped: blocks\.0\.attn\.qkv\.weight"):
        load_vision_init(tiny_clip().visual, tmp_path / "mim")


def open_clip_model(embed_dim: int) -> torch.nn.Module:
    """A tiny open_clip CLIP (QuickGELU, as OpenAI's) whose state dict stands in for CLIP-L's."""
    torch.manual_seed(3)
    vision = dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16)
    text = dict(context_length=20, vocab_size=49408, width=32, heads=2, layers=2)
    return open_clip.model.CLIP(embed_dim, vision, text, quick_gelu=True).eval()


def test_text_tower_from_an_open_clip_state_dict_matches_open_clip(tmp_path):
    reference = open_clip_model(embed_dim=24)
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    model = tiny_clip()
    load_text_init(model.text, tmp_path / "clip.pt")  # 20 positions cut to the context of 16
    tokens = tokenizer_for(16)(["a photo of a cat", "two red squares on a checkered background"])
    with torch.no_grad():
        expected = reference.encode_text(torch.nn.functional.pad(tokens, (0, 4)))
        torch.testing.assert_close(model.eval().encode_text(tokens), expected, atol=1e-6, rtol=1e-5)


def test_text_projection_of_another_width_starts_fresh(tmp_path, caplog):
    torch.save(open_clip_model(embed_dim=16).state_dict(), tmp_path / "clip.pt")  # CLIP-L: 768 -> 768
    model = tiny_clip()  # EVA-CLIP-g: 768 -> 1024
    before = model.text.text_projection.detach().clone()
    with caplog.at_level(logging.INFO, logger="flyeva.tasks.clip.init_weights"):
        load_text_init(model.text, tmp_path / "clip.pt")
    assert torch.equal(model.text.text_projection, before)
    assert "text_projection (32, 16) does not fit (32, 24)" in caplog.text
    source = open_clip_model(embed_dim=16).state_dict()
    assert torch.equal(model.text.token_embedding.weight, source["token_embedding.weight"])


def test_text_init_without_text_keys_is_refused(tmp_path):
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, tmp_path / "visual_only.pt")
    with pytest.raises(CheckpointError, match="holds no CLIP text tower"):
        load_text_init(tiny_clip().text, tmp_path / "visual_only.pt")


def expected_lr_scale(name: str) -> tuple[float, float]:
    """(lr scale, weight decay) by hand for the groups of `test_every_group_gets_its_tower_lr`."""
    if name == "logit_scale":
        return 1.0, 0.0
    no_decay = name.endswith("bias") or "norm" in name or name.startswith(("visual.cls_token", "visual.pos"))
    no_decay |= name.endswith(("q_bias", "v_bias", "ln_1.weight", "ln_2.weight", "ln_final.weight"))
    no_decay |= name == "text.positional_embedding"
    if name.startswith("visual."):  # lr 1e-3 of base 2e-3, layer decay 0.8 over 4 blocks, wd 0.1
        part = name.removeprefix("visual.")
        layer = 0 if part.startswith(("cls_token", "pos_embed", "patch_embed")) else 5
        layer = int(part.split(".")[1]) + 1 if part.startswith("blocks.") else layer
        return 0.5 * 0.8 ** (5 - layer), 0.0 if no_decay else 0.1
    part = name.removeprefix("text.")  # lr 4e-4, layer decay 0.5 over 2 blocks, wd 0.2
    layer = 0 if part.startswith(("token_embedding", "positional_embedding")) else 3
    layer = int(part.split(".")[2]) + 1 if part.startswith("transformer.resblocks.") else layer
    return 0.2 * 0.5 ** (3 - layer), 0.0 if no_decay else 0.2


def test_every_group_gets_its_tower_lr_layer_decay_and_weight_decay():
    section = tiny_section(lr=1e-3, weight_decay=0.1, layer_decay=0.8)
    section.text = TextSection(**TINY_TEXT, lr=4e-4, weight_decay=0.2, layer_decay=0.5)
    model = tiny_clip()
    optimizer = build_adamw(clip_param_groups(model, section.vision, section.text, 2e-3, 0.05), OptimConfig())
    apply_lr(optimizer, 1.5e-3)  # the engine's per-step schedule value
    names = {id(p): n for n, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale, decay = expected_lr_scale(names[id(param)])
            assert group["lr"] == pytest.approx(1.5e-3 * scale, rel=1e-12), names[id(param)]
            assert group["weight_decay"] == decay, names[id(param)]
            seen.add(names[id(param)])
    assert seen == set(names.values())


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every weight moved off its init value, so a load that skips a tensor shows."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    return model.eval()


def write_legacy_clip_folder(model, section, folder):
    """The layout flyeva 0.1.0's `save_clip` wrote: clip.safetensors + clip.json (format flyeva-clip-v1)."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "clip.safetensors"))
    config = {"format": "flyeva-clip-v1", "arch": arch_dict(section), "step": 8}
    (folder / "clip.json").write_text(json.dumps(config))


def test_save_writes_one_weights_folder_and_load_is_bit_identical(tmp_path):
    section = tiny_section()
    model = randomised(tiny_clip())
    save_clip(model, section, tmp_path / "final", extra={"step": 3})
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (config["kind"], config["step"], config["arch"]) == ("clip", 3, arch_dict(section))
    loaded, loaded_section = load_clip(tmp_path / "final")
    assert loaded_section.embed_dim == 24 and loaded_section.text.quick_gelu
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    generic = weights.load(tmp_path / "final")  # the one reader every kind goes through
    assert isinstance(generic, EvaClip) and torch.equal(generic.logit_scale, model.logit_scale)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 49408, (2, 16))
    with torch.no_grad():
        for got, want in zip(loaded.eval()(images, tokens), model(images, tokens), strict=True):
            assert torch.equal(got, want)


def test_a_flyeva_0_1_0_clip_folder_still_loads(tmp_path):
    section = tiny_section()
    model = randomised(tiny_clip())
    write_legacy_clip_folder(model, section, tmp_path / "old")
    loaded, loaded_section = load_clip(tmp_path / "old")
    assert loaded_section.vision.size == "miniature" and loaded_section.text.layers == 2
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("layout", ["current", "flyeva_0_1_0"])
def test_eva_tower_teacher_reads_both_folder_layouts(tmp_path, layout):
    section = tiny_section()
    model = randomised(tiny_clip())
    if layout == "current":
        save_clip(model, section, tmp_path / "final")
    else:
        write_legacy_clip_folder(model, section, tmp_path / "final")
    assert is_eva_clip_folder(tmp_path / "final") and is_clip_folder(tmp_path / "final")
    teacher = load_eva_clip_teacher(tmp_path / "final")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.visual.head(model.visual.forward_features(images)[:, 1:])
        assert teacher(images).shape == (2, 64, 24)
        assert torch.equal(teacher(images), expected)


def test_a_folder_of_another_kind_is_not_a_clip(tmp_path):
    save_flyeva(build_mim_model("miniature", teacher_dim=48), tmp_path / "mim")
    assert not is_clip_folder(tmp_path / "mim") and not is_eva_clip_folder(tmp_path / "mim")
    with pytest.raises(CheckpointError, match=r"not a flyeva CLIP folder.*flyeva clip convert"):
        load_clip(tmp_path / "mim")
    (tmp_path / "hf").mkdir()  # a Hugging Face CLIP folder: config.json without a flyeva kind
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.json").write_text('{"kind": "cl')
    for folder in ("hf", "torn"):
        assert not is_clip_folder(tmp_path / folder) and not is_eva_clip_folder(tmp_path / folder)


def test_accum_steps_is_refused_in_favour_of_micro_batches():
    cfg = load_config(ClipConfig, recipe_path("clip", "miniature"), ["train.accum_steps=2"])
    with pytest.raises(ConfigError, match=r"loss\.micro_batch_size"):
        check_config(cfg)


@pytest.mark.parametrize("recipe", ["miniature", "eva_clip_base", "eva_clip_giant"])
def test_recipes_load(recipe):
    cfg = load_config(ClipConfig, recipe_path("clip", recipe), [])
    check_config(cfg)
    if recipe == "eva_clip_giant":  # docs/recipes.md section 5
        assert (cfg.model.vision.size, cfg.model.embed_dim) == ("eva_giant", 1024)
        assert (cfg.model.text.layers, cfg.model.text.width, cfg.model.text.heads) == (12, 768, 12)
        assert (cfg.model.text.context_length, cfg.model.text.vocab_size) == (77, 49408)
        assert not cfg.model.text.quick_gelu  # the release's EVA-CLIP-g text tower is GELU
        assert (cfg.train.precision, cfg.train.strategy) == ("fp16", "zero1")
        assert cfg.train.batch_size * 256 == 40960  # ~41k global on 256 GPUs


def test_fsdp_shards_both_towers_block_by_block():
    from flyeva.engine.distributed import shard_units

    model = tiny_clip()
    units = shard_units(model)
    assert units == [*model.visual.blocks, *model.text.transformer.resblocks]
