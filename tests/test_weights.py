"""flyeva's one weights format: every kind round-trips through `load`, 0.1.0 folders still load, and
a folder whose config.json and weights disagree is refused before anything is allocated."""

import json
import resource

import pytest
import torch
from conftest import tiny_encoder
from safetensors.torch import save_file
from timm.models.eva import Eva

from flyeva.models.checkpoint import load_any, load_flyeva, save_flyeva
from flyeva.models.eva import build_encoder, build_mim_model
from flyeva.models.weights import WeightsError, load, read_config, save_weights
from flyeva.tasks.classify.model import build_classifier, load_classifier, save_classifier
from flyeva.tasks.classify.probe import LinearProbeHead

TINY = tiny_encoder(16)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("kind", ["mim", "encoder", "classifier", "probe"])
def test_every_kind_round_trips_through_the_one_reader(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "mim":
        model = build_mim_model(TINY, teacher_dim=24)
        folder = save_flyeva(model, tmp_path / kind)
    elif kind == "encoder":
        model = build_encoder(TINY)
        folder = save_flyeva(model, tmp_path / kind)
    elif kind == "classifier":
        model = build_classifier(TINY, 5)
        folder = save_classifier(model, tmp_path / kind, {"classes": list("abcde")})
    else:
        model = LinearProbeHead(32, 7)
        folder = save_weights(model, tmp_path / kind, kind="probe", arch={"dim": 32, "num_classes": 7})
    config = read_config(folder)
    assert config["kind"] == kind and config["format_version"] == 2 and "arch" in config
    loaded = load(folder)
    assert type(loaded) is type(model)
    assert_same_state(model, loaded)
    assert loaded.weights_config["kind"] == kind


def test_an_encoder_reads_out_of_a_mim_folder_and_a_mim_model_out_of_an_encoder_folder(tmp_path):
    mim = build_mim_model(TINY, teacher_dim=24)
    encoder = load(save_flyeva(mim, tmp_path / "mim"), kind="encoder")
    assert isinstance(encoder, Eva) and not hasattr(encoder, "mask_token")
    assert torch.equal(encoder.pos_embed, mim.pos_embed)
    back = load_flyeva(save_flyeva(encoder, tmp_path / "encoder"), kind="mim")
    assert torch.equal(back.blocks[1].mlp.fc2.weight, mim.blocks[1].mlp.fc2.weight)


def write_version_1(folder, model, config):
    """A folder exactly as flyeva 0.1.0 wrote it: top-level `size`, no `arch`, no format_version."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))


def test_folders_written_by_0_1_0_still_load(tmp_path):
    size = dict(TINY.__dict__)
    mim = build_mim_model(TINY, teacher_dim=24)
    write_version_1(
        tmp_path / "mim", mim, {"format": "flyeva", "kind": "mim", "size": size, "teacher_dim": 24}
    )
    assert_same_state(mim, load_any(tmp_path / "mim"))
    classifier = build_classifier(TINY, 3)
    timm_kwargs = dict(
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=3,
        global_pool="avg",
    )
    config = {
        "format": "flyeva",
        "kind": "classifier",
        "size": size,
        "timm_kwargs": timm_kwargs,
        "classes": ["a"],
    }
    write_version_1(tmp_path / "classifier", classifier, config)
    loaded, loaded_config = load_classifier(tmp_path / "classifier")
    assert_same_state(classifier, loaded)
    assert loaded_config["classes"] == ["a"]


def test_a_config_claiming_a_giant_model_is_refused_before_allocation(tmp_path):
    folder = save_flyeva(build_encoder(TINY), tmp_path / "crafted")
    config = read_config(folder)
    config["arch"]["size"] = dict(
        img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144
    )
    (folder / "config.json").write_text(json.dumps(config))
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(WeightsError, match="does not match its architecture") as error:
        load(folder)
    assert "mis-shaped: pos_embed: file (1, 17, 32) vs model (1, 257, 1408)" in str(error.value)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 500, f"peak memory grew by {grown_mib:.0f} MiB; EVA-g in fp32 would be ~4000"


def test_non_finite_weights_are_never_written_and_a_broken_folder_is_named(tmp_path):
    model = build_encoder(TINY)
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = float("inf")
    with pytest.raises(WeightsError, match=r"refusing to write non-finite weights .* e\.g\. pos_embed"):
        save_flyeva(model, tmp_path / "bad")
    assert not (tmp_path / "bad" / "model.safetensors").exists()
    folder = save_flyeva(build_encoder(TINY), tmp_path / "good")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=r"config\.json is not valid JSON"):
        load(folder)
    folder = save_flyeva(build_encoder(TINY), tmp_path / "cut")
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:64])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load(folder)
    save_weights(build_encoder(TINY), tmp_path / "robot", kind="robot", arch={})
    with pytest.raises(WeightsError, match="unknown weights kind 'robot'"):
        load(tmp_path / "robot")


def test_models_import_nothing_from_tasks_teachers_or_engine():
    """Imports flow downward: builders are named by dotted strings, never imported by models/."""
    import ast
    from pathlib import Path

    import flyeva.models

    upward = []
    for file in sorted(Path(flyeva.models.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            upward += [
                f"{file.name}: {n}"
                for n in names
                if n.startswith(("flyeva.tasks", "flyeva.teachers", "flyeva.engine"))
            ]
    assert upward == []


def test_every_loader_refuses_nan_weights_naming_the_tensor(tmp_path):
    """A folder whose safetensors holds a NaN (a diverged run's, edited by hand) never evaluates."""
    from safetensors.torch import load_file, save_file

    from flyeva.models.checkpoint import load_weights
    from flyeva.models.eva import build_encoder, size_arch
    from flyeva.models.weights import WeightsError, load, save_weights

    encoder = build_encoder(TINY)
    folder = save_weights(encoder, tmp_path / "enc", kind="encoder", arch=size_arch(encoder))
    state = load_file(str(folder / "model.safetensors"))
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"blocks\.1\.mlp\.fc1\.weight holds NaN or Inf"):
        load(folder)
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("inf")
    with pytest.raises(WeightsError, match=r"blocks\.1\.mlp\.fc1\.weight holds NaN or Inf"):
        load_weights(build_encoder(TINY), state)  # the path release checkpoints take


def test_weights_files_follow_the_umask_for_shared_storage(tmp_path):
    """safetensors writes owner-only files; a weights folder on shared storage must be readable."""
    import os

    previous = os.umask(0o022)
    try:
        encoder = build_encoder(TINY)
        folder = save_weights(encoder, tmp_path / "enc", kind="encoder", arch={"size": TINY.__dict__})
    finally:
        os.umask(previous)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (folder / "config.json").stat().st_mode & 0o777 == 0o644
