"""flyeva EVA-CLIP -> open_clip, through open_clip's own entry points (add_model_config, create_model)."""

import json

import open_clip
import pytest
import torch
from clip_dist_worker import tiny_clip
from open_clip.transformer import QuickGELU
from test_clip_model import randomised, tiny_section

from flyeva.cli import main
from flyeva.tasks.clip.convert import load_any_clip
from flyeva.tasks.clip.model import (
    ClipModelSection,
    TextSection,
    VisionSection,
    arch_dict,
    build_clip,
    save_clip,
)
from flyeva.tasks.clip.open_clip_export import is_open_clip_eva_g, open_clip_state_dict


@pytest.mark.parametrize(("quick_gelu", "suffix"), [(False, ".safetensors"), (True, ".bin")])
def test_export_loads_in_open_clip_with_equal_embeddings_and_round_trips(
    tmp_path, capsys, quick_gelu, suffix
):
    section = tiny_section()
    section.text.quick_gelu = quick_gelu
    model = randomised(tiny_clip())
    model.text = build_clip(section, release_init=False).text  # the activation under test
    randomised(model.text)
    save_clip(model, section, tmp_path / "flyeva")
    name = f"tiny_eva_clip_{'quickgelu' if quick_gelu else 'gelu'}"
    out = tmp_path / f"{name}{suffix}"
    assert main(["clip", "export-open-clip", str(tmp_path / "flyeva"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f'open_clip.add_model_config("{out.with_suffix(".json")}")' in printed
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["vision_cfg"]["timm_model_name"].startswith("local-dir:")  # not EVA-g: sizes for timm
    assert config.get("quick_gelu", False) == quick_gelu

    open_clip.add_model_config(out.with_suffix(".json"))
    theirs = open_clip.create_model(name, pretrained=str(out)).eval()
    assert isinstance(theirs.text.transformer.resblocks[0].mlp.gelu, QuickGELU) == quick_gelu
    images, tokens = torch.randn(3, 3, 32, 32), open_clip.tokenize(["a", "red square", "two shapes"], 16)
    with torch.no_grad():
        for ours, other in (
            (model.encode_image(images), theirs.encode_image(images)),
            (model.encode_text(tokens), theirs.encode_text(tokens)),
            (model.logit_scale, theirs.logit_scale),
        ):
            assert ours.shape == other.shape
            assert (ours - other).abs().max() <= 1e-5
    exported = open_clip_state_dict(model)
    assert exported.keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(value, exported[key]), key

    back, back_section, provenance = load_any_clip(out)  # the config next to the file gives the activation
    assert provenance["text_activation_from"] == "the open_clip model config next to the file"
    assert arch_dict(back_section) == arch_dict(section)
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key  # flyeva -> open_clip -> flyeva: bit-identical
    with torch.no_grad():
        for ours, again in zip(model(images, tokens), back.eval()(images, tokens), strict=True):
            assert torch.equal(ours, again)


def test_eva_g_export_is_open_clips_eva01_g_14_key_for_key():
    """At EVA-g size the built-in "EVA01-g-14" (timm eva_giant_patch14_224) is the target; built on meta."""
    section = ClipModelSection(
        embed_dim=1024, vision=VisionSection(size="eva_giant"), text=TextSection(quick_gelu=False)
    )
    assert is_open_clip_eva_g(section)
    with torch.device("meta"):
        ours = open_clip_state_dict(build_clip(section, release_init=False))
        theirs = open_clip.create_model("EVA01-g-14", device="meta").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert len(ours) == 678
    section.text.quick_gelu = True  # EVA01-g-14's text tower is GELU: a QuickGELU one needs its own config
    assert not is_open_clip_eva_g(section)
