"""Converters: release <-> flyeva <-> timm round trips, foreign layouts, and bad files."""

import collections

import pytest
import timm
import torch
from safetensors.torch import load_file

from flyeva.cli import main as cli
from flyeva.models.checkpoint import (
    CheckpointError,
    export_release,
    export_timm,
    load_any,
    load_flyeva,
    load_release_checkpoint,
    save_flyeva,
    timm_recipe,
)
from flyeva.models.eva import EVA_SIZES, build_mim_model


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_mim_model("eva_tiny", drop_path_rate=0.0).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped key would show
        for name, param in model.named_parameters():
            if name.endswith(("bias", "norm.weight", "norm1.weight", "norm2.weight")):
                param.add_(torch.randn_like(param) * 0.1)
    return model


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_flyeva_folder_round_trip_is_bit_identical(tiny, tmp_path):
    save_flyeva(tiny, tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.json", "model.safetensors"]
    assert_same_state(load_flyeva(tmp_path / "w").state_dict(), tiny.state_dict())
    encoder = load_flyeva(tmp_path / "w", kind="encoder")
    assert "mask_token" not in encoder.state_dict()
    assert torch.equal(encoder.state_dict()["norm.weight"], tiny.norm.weight)


def test_release_format_round_trip_is_bit_identical(tiny, tmp_path):
    path = export_release(tiny, tmp_path / "release.pt")
    assert list(torch.load(path, weights_only=True)) == ["model"]
    save_flyeva(load_release_checkpoint(path), tmp_path / "back")
    assert_same_state(load_flyeva(tmp_path / "back").state_dict(), tiny.state_dict())


def test_timm_export_loads_through_timm_create_model(tiny, tmp_path):
    path = export_timm(tiny, tmp_path / "timm.safetensors")
    size = EVA_SIZES["eva_tiny"]
    # The real timm entry point of EVA-01, shrunk to tiny width by model kwargs.
    model = timm.create_model(
        "eva_giant_patch14_224",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(path)),
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_dim / size.embed_dim,
    ).eval()
    state = model.state_dict()
    for key, value in tiny.state_dict().items():
        if key in ("mask_token", "lm_head.weight", "lm_head.bias"):
            continue
        assert torch.equal(state[key.replace("norm.", "fc_norm.") if key.startswith("norm.") else key], value)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = tiny.forward_features(images)
        theirs = model.fc_norm(model.forward_features(images))
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert "eva_giant_patch14_224" in timm_recipe("eva_giant", path)


def _release_variants(state):
    yield "model", {"model": state}
    yield "module", {"module": {f"module.{k}": v for k, v in state.items()}}
    yield "model_ema", {"model_ema": state, "epoch": 3}
    yield "top level", dict(state)


def test_release_layouts_and_fp16_load(tiny, tmp_path):
    half = {k: v.half() for k, v in tiny.state_dict().items()}
    for name, payload in _release_variants(half):
        path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(payload, path)
        model = load_release_checkpoint(path)
        for key, value in model.state_dict().items():
            assert value.dtype == torch.float32
            assert torch.equal(value, half[key].float()), (name, key)


def test_eva_clip_visual_prefix_and_mae_qkv_bias(tiny, tmp_path):
    encoder = {k: v for k, v in tiny.state_dict().items() if k not in ("mask_token",) and "lm_head" not in k}
    clip = {f"visual.{k}": v for k, v in encoder.items()}
    clip["visual.head.weight"] = torch.randn(1024, 192)
    clip["text.token_embedding.weight"] = torch.randn(10, 8)
    clip["logit_scale"] = torch.tensor(4.6)
    # MAE-style: one full qkv bias with a zero k part.
    for i in range(12):
        q, v = clip.pop(f"visual.blocks.{i}.attn.q_bias"), clip.pop(f"visual.blocks.{i}.attn.v_bias")
        clip[f"visual.blocks.{i}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    torch.save({"state_dict": clip}, tmp_path / "eva_clip.pt")
    model = load_release_checkpoint(tmp_path / "eva_clip.pt", kind="encoder")
    assert_same_state(model.state_dict(), encoder)


def test_cli_convert_release_and_to_timm(tiny, tmp_path, capsys):
    export_release(tiny, tmp_path / "release.pt")
    assert cli(["convert", "release", str(tmp_path / "release.pt"), "--out", str(tmp_path / "flyeva")]) == 0
    assert_same_state(load_any(tmp_path / "flyeva").state_dict(), tiny.state_dict())
    assert (
        cli(["convert", "to-timm", str(tmp_path / "flyeva"), "--out", str(tmp_path / "t.safetensors")]) == 0
    )
    assert "fc_norm.weight" in load_file(tmp_path / "t.safetensors")
    assert cli(["convert", "to-release", str(tmp_path / "flyeva"), "--out", str(tmp_path / "r.pt")]) == 0
    assert_same_state(torch.load(tmp_path / "r.pt", weights_only=True)["model"], tiny.state_dict())


class NotData:  # a pickled class instance needs code to load
    pass


# The TorchScript file is a fixture of the refusal test; scripting it is deprecated but not the point.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_bad_files_give_the_documented_errors(tiny, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_release_checkpoint(tmp_path / "missing.pt")

    export_release(tiny, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_release_checkpoint(tmp_path / "truncated.pt")
    save_flyeva(tiny, tmp_path / "w")
    weights = (tmp_path / "w" / "model.safetensors").read_bytes()
    (tmp_path / "w" / "model.safetensors").write_bytes(weights[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_flyeva(tmp_path / "w")

    torch.save({"model": tiny.state_dict(), "args": NotData()}, tmp_path / "code.pt")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_release_checkpoint(tmp_path / "code.pt")
    # The explicit escape hatch converts it once.
    assert load_release_checkpoint(tmp_path / "code.pt", trust_pickle=True) is not None

    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    scripted.save(str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(CheckpointError, match="flyeva convert teacher --openai-torchscript"):
        load_release_checkpoint(tmp_path / "ViT-L-14.pt")

    # The release's argparse.Namespace is plain data and loads without trust.
    import argparse

    torch.save({"model": tiny.state_dict(), "args": argparse.Namespace(lr=1e-3)}, tmp_path / "args.pt")
    assert load_release_checkpoint(tmp_path / "args.pt") is not None

    assert (
        cli(["convert", "to-timm", str(tmp_path / "code.pt"), "--out", str(tmp_path / "x.safetensors")]) == 2
    )
    assert "--trust-pickle" in capsys.readouterr().err


def test_wrong_size_lists_missing_unexpected_and_misshaped_keys(tiny, tmp_path):
    small = build_mim_model("eva_small", release_init=False)
    save_flyeva(small, tmp_path / "small")
    state = dict(tiny.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.3.mlp.fc1.bias"]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "small" / "model.safetensors"))
    with pytest.raises(CheckpointError) as error:
        load_flyeva(tmp_path / "small")
    message = str(error.value)
    assert "missing: blocks.3.mlp.fc1.bias" in message
    assert "unexpected: extra.weight" in message
    assert "mis-shaped: pos_embed: file (1, 257, 192) vs model (1, 257, 384)" in message
    counts = collections.Counter(line.split(":")[0].strip() for line in message.splitlines()[1:-1])
    assert counts == {"missing": 1, "unexpected": 1, "mis-shaped": counts["mis-shaped"]}
