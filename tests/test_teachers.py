"""CLIP teacher: every weight format gives the same MIM targets as the source model (docs/recipes.md §3)."""

import json
import logging
import re

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

from flyeva.cli import main as cli
from flyeva.models.weights import load, read_config
from flyeva.teachers import (
    ClipTeacher,
    TeacherLoadError,
    build_clip_teacher,
    check_token_grid,
    convert_openai_torchscript,
    frozen,
    load_clip_teacher,
    precision_name,
    resolve_teacher_dtype,
    save_clip_teacher,
)

pytestmark = [  # tracing the fixture archive is test setup, its deprecation notices are noise
    pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]
TOL = 1e-5
TINY = "flyeva-test-tiny-quickgelu"  # image 32, patch 8 -> 4x4 grid, width 128 (2 heads of 64), 2 layers
TINY_GELU = "flyeva-test-tiny"  # same shapes, GELU
TINY_P4_L1 = "flyeva-test-tiny-p4-l1-quickgelu"  # patch 4, 1 layer: shapes and keys differ
VISION = dict(image_size=32, patch_size=8, width=128, layers=2, head_width=64)
TEXT = dict(context_length=8, vocab_size=50, width=32, heads=2, layers=1)


class NotATensor:
    """A pickled object that torch.load(weights_only=True) must refuse."""


def _register_tiny_configs(directory):
    configs = {
        TINY: dict(embed_dim=32, quick_gelu=True, vision_cfg=VISION, text_cfg=TEXT),
        TINY_GELU: dict(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT),
        TINY_P4_L1: dict(
            embed_dim=32, quick_gelu=True, vision_cfg={**VISION, "patch_size": 4, "layers": 1}, text_cfg=TEXT
        ),
    }
    for name, config in configs.items():
        (directory / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(directory)


def _hf_state_from_open_clip(visual, output_dim):
    """Reverse mapping open_clip -> HF CLIPVisionModelWithProjection, written independently of flyeva's."""
    sd = visual.state_dict()
    hf = {
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.pre_layrnorm.weight": sd["ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": sd["ln_pre.bias"],
        "vision_model.post_layernorm.weight": sd["ln_post.weight"],
        "vision_model.post_layernorm.bias": sd["ln_post.bias"],
        "visual_projection.weight": sd["proj"].t().contiguous(),
    }
    assert sd["proj"].shape[1] == output_dim
    for i in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.in_proj_{kind}"].chunk(3, dim=0)
            hf[f"{dst}self_attn.q_proj.{kind}"] = q.clone()
            hf[f"{dst}self_attn.k_proj.{kind}"] = k.clone()
            hf[f"{dst}self_attn.v_proj.{kind}"] = v.clone()
            hf[f"{dst}self_attn.out_proj.{kind}"] = sd[f"{src}attn.out_proj.{kind}"]
            hf[f"{dst}layer_norm1.{kind}"] = sd[f"{src}ln_1.{kind}"]
            hf[f"{dst}layer_norm2.{kind}"] = sd[f"{src}ln_2.{kind}"]
            hf[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.c_fc.{kind}"]
            hf[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.c_proj.{kind}"]
    return hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    (root / "configs").mkdir()
    _register_tiny_configs(root / "configs")
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=VISION, text_cfg=TEXT, quick_gelu=True).eval()
    with torch.no_grad():  # default LayerNorm (1, 0) and zero biases would hide mapping mistakes
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    # Reference: open_clip's own forward; ln_post output on all tokens, CLS dropped, @ proj.
    captured = {}
    hook = model.visual.ln_post.register_forward_hook(lambda m, i, out: captured.update(tokens=out))
    with torch.no_grad():
        pooled = model.encode_image(images)
    hook.remove()
    assert captured["tokens"].shape == (3, 17, 128)
    reference = captured["tokens"][:, 1:] @ model.visual.proj.detach()

    state = model.state_dict()
    torch.save(state, root / "clip.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "clip_wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, root / "clip.safetensors")
    return dict(root=root, model=model, images=images, reference=reference, pooled=pooled)


@pytest.fixture(scope="module")
def torchscript_path(tiny):
    path = tiny["root"] / "ViT-tiny-openai.pt"
    # check_trace=False: nn.MultiheadAttention's fast path makes the re-trace graph differ.
    traced = torch.jit.trace_module(tiny["model"], {"encode_image": (tiny["images"],)}, check_trace=False)
    torch.jit.save(traced, path)
    return path


def assert_same_weights(a, b):
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(v, state_b[k]) for k, v in state_a.items())


def _max_errors(actual, expected):
    abs_err = (actual - expected).abs().max().item()
    rel_err = abs_err / expected.abs().max().item()
    return abs_err, rel_err


def test_open_clip_state_dicts_match_source_model(tiny):
    for name in ("clip.pt", "clip_wrapped.pth", "clip.safetensors"):
        teacher = load_clip_teacher(tiny["root"] / name, TINY)
        targets = teacher(tiny["images"])
        assert targets.shape == (3, 16, 32)
        abs_err, rel_err = _max_errors(targets, tiny["reference"])
        assert abs_err < TOL and rel_err < TOL, (name, abs_err, rel_err)
    # Sanity of the reference itself: the CLS row of the same ln_post output is open_clip's pooled output.
    assert tiny["reference"].abs().max() > 0.1 and tiny["pooled"].shape == (3, 32)


def test_hugging_face_directory_matches_source_and_hf_forward(tiny):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    hf_model = transformers.CLIPVisionModelWithProjection(config).eval()
    hf_model.load_state_dict(_hf_state_from_open_clip(tiny["model"].visual, 32), strict=True)
    hf_dir = tiny["root"] / "hf-vision"
    hf_model.save_pretrained(hf_dir)
    assert (hf_dir / "model.safetensors").is_file()

    teacher = load_clip_teacher(hf_dir)
    assert teacher.quick_gelu
    targets = teacher(tiny["images"])
    abs_err, rel_err = _max_errors(targets, tiny["reference"])
    assert abs_err < TOL and rel_err < TOL

    with torch.no_grad():  # HF's own path: last_hidden_state -> post_layernorm -> visual_projection
        hidden = hf_model(pixel_values=tiny["images"]).last_hidden_state
        hf_targets = hf_model.visual_projection(hf_model.vision_model.post_layernorm(hidden)[:, 1:])
    abs_err, rel_err = _max_errors(targets, hf_targets)
    assert abs_err < TOL and rel_err < TOL

    # pytorch_model.bin instead of safetensors, same config.json.
    bin_dir = tiny["root"] / "hf-vision-bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(hf_model.state_dict(), bin_dir / "pytorch_model.bin")
    assert torch.equal(load_clip_teacher(bin_dir)(tiny["images"]), targets)


def test_torchscript_conversion_matches_source(tiny, torchscript_path):
    out = convert_openai_torchscript(torchscript_path, tiny["root"] / "converted" / "tiny")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = read_config(out)
    assert (config["kind"], config["source"]) == ("teacher", {"file": "ViT-tiny-openai.pt"})
    assert config["arch"] == dict(
        name="openai:ViT-tiny-openai",
        act="quick_gelu",
        embed_dim=32,
        vision_cfg={**VISION, "mlp_ratio": 4.0},
    )
    teacher = load_clip_teacher(out)  # no model name: config.json describes it
    assert teacher.quick_gelu and teacher.grid_size == (4, 4)
    abs_err, rel_err = _max_errors(teacher(tiny["images"]), tiny["reference"])
    assert abs_err < TOL and rel_err < TOL
    # The one weights reader builds the same teacher from the folder.
    loaded = load(out)
    assert type(loaded) is ClipTeacher
    assert_same_weights(loaded, teacher)
    # A model name that agrees is accepted; one that contradicts the folder (GELU) is refused.
    assert torch.equal(load_clip_teacher(out, TINY)(tiny["images"]), teacher(tiny["images"]))
    with pytest.raises(TeacherLoadError, match="contradicts"):
        load_clip_teacher(out, TINY_GELU)


def test_a_teacher_file_with_the_older_json_beside_it_still_loads(tiny, tmp_path):
    """What `flyeva convert teacher` wrote before weights folders: NAME.safetensors + NAME.json."""
    teacher = load_clip_teacher(tiny["root"] / "clip.safetensors", TINY)
    state = {f"visual.{k}": v.contiguous() for k, v in teacher.visual.state_dict().items()}
    save_file(state, tmp_path / "old.safetensors", metadata={"format": "flyeva-clip-teacher-v1"})
    sidecar = dict(
        format="flyeva-clip-teacher-v1",
        name="openai:old",
        act="quick_gelu",
        embed_dim=32,
        vision_cfg={**VISION, "mlp_ratio": 4.0},
        source="ViT-tiny-openai.pt",
    )
    (tmp_path / "old.json").write_text(json.dumps(sidecar))
    old = load_clip_teacher(tmp_path / "old.safetensors")
    assert (old.name, old.quick_gelu) == ("openai:old", True)
    assert_same_weights(old, teacher)
    with pytest.raises(TeacherLoadError, match=r"contradicts .*old\.json"):
        load_clip_teacher(tmp_path / "old.safetensors", TINY_GELU)


def test_cli_converts_a_torchscript_teacher_into_a_folder(tiny, torchscript_path, tmp_path, capsys):
    command = ["convert", "teacher", "--openai-torchscript", str(torchscript_path), "--out"]
    assert cli([*command, str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 't'}\n"
    assert read_config(tmp_path / "t")["kind"] == "teacher"
    assert cli([*command, str(tmp_path / "t.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error == (
        "flyeva: error: a teacher is written as a weights folder (model.safetensors + config.json), "
        f"not one file: pass --out {tmp_path / 't'}\n"
    )
    assert not (tmp_path / "t.safetensors").exists()


def test_gelu_name_warns_and_changes_targets(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="flyeva.teachers.clip"):
        gelu_teacher = load_clip_teacher(tiny["root"] / "clip.pt", TINY_GELU)
    assert f"'{TINY_GELU}-quickgelu'" in caplog.text
    assert not gelu_teacher.quick_gelu
    gelu_targets = gelu_teacher(tiny["images"])
    # The flag matters: same weights, different activation -> clearly different targets.
    rel_diff = (gelu_targets - tiny["reference"]).norm() / tiny["reference"].norm()
    assert rel_diff > 1e-3, rel_diff  # measured 7.2e-3, against a format tolerance of 1e-5


def test_teacher_is_frozen_and_targets_train_a_student(tiny):
    teacher = load_clip_teacher(tiny["root"] / "clip.safetensors", TINY)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert sum(p.numel() for p in teacher.parameters() if p.requires_grad) == 0
    assert (teacher.grid_size, teacher.patch_size, teacher.image_size) == ((4, 4), 8, 32)
    assert (teacher.embed_dim, teacher.num_patches) == (32, 16)

    targets = teacher(tiny["images"])
    assert not targets.requires_grad and not targets.is_inference()
    student = torch.nn.Linear(5, 32)
    predictions = student(torch.randn(3, 16, 5))
    loss = -torch.nn.functional.cosine_similarity(predictions, targets, dim=-1).mean()
    loss.backward()  # fails if the target were an inference tensor saved for backward
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match=r"expects images \[B, 3, 32, 32\]"):
        teacher(torch.randn(1, 3, 28, 28))


def test_torchscript_archive_is_refused_with_conversion_command(torchscript_path):
    for model_name in (None, TINY):
        with pytest.raises(TeacherLoadError, match="flyeva convert teacher --openai-torchscript"):
            load_clip_teacher(torchscript_path, model_name)


def test_unreadable_files_give_clear_errors(tiny):
    root = tiny["root"]
    torch.save({"state_dict": tiny["model"].state_dict(), "args": NotATensor()}, root / "with_code.pt")
    with pytest.raises(TeacherLoadError, match=r"pickled Python objects.*weights_only=True.*re-save only"):
        load_clip_teacher(root / "with_code.pt", TINY)

    for name in ("clip.pt", "clip.safetensors"):
        data = (root / name).read_bytes()
        truncated = root / f"truncated_{name}"
        truncated.write_bytes(data[: len(data) // 2])
        with pytest.raises(TeacherLoadError, match="truncated or corrupt"):
            load_clip_teacher(truncated, TINY)

    with pytest.raises(TeacherLoadError, match="not found"):
        load_clip_teacher(root / "missing.pt", TINY)
    with pytest.raises(TeacherLoadError, match=r"pass its model name, e\.g\. 'ViT-L-14-quickgelu'"):
        load_clip_teacher(root / "clip.pt")
    with pytest.raises(TeacherLoadError, match=r"closest: \['flyeva-test-tiny-quickgelu'"):
        load_clip_teacher(root / "clip.pt", "flyeva-test-tiny-quickgel")
    with pytest.raises(TeacherLoadError, match="not a TorchScript archive"):
        convert_openai_torchscript(root / "clip.pt", root / "never")


def test_shape_mismatch_lists_keys_and_both_shapes(tiny):
    with pytest.raises(TeacherLoadError) as info:
        load_clip_teacher(tiny["root"] / "clip.pt", TINY_P4_L1)
    message = str(info.value)
    assert "unexpected (12): transformer.resblocks.1." in message  # 12 tensors per block
    assert "conv1.weight: file [128, 3, 8, 8] vs model [128, 3, 4, 4]" in message
    assert "positional_embedding: file [17, 128] vs model [65, 128]" in message

    state = {k: v for k, v in tiny["model"].state_dict().items() if k != "visual.ln_post.weight"}
    torch.save(state, tiny["root"] / "no_ln_post.pt")
    with pytest.raises(TeacherLoadError, match=r"missing \(1\): ln_post.weight"):
        load_clip_teacher(tiny["root"] / "no_ln_post.pt", TINY)


def test_token_grid_check():
    teacher = build_clip_teacher(
        dict(image_size=32, patch_size=8, width=64, layers=1, heads=2, mlp_ratio=4, output_dim=16), seed=0
    )
    assert check_token_grid(teacher, (4, 4), 32) is None
    # Student patch 4 at 32 px -> 8x8 tokens vs the teacher's 4x4.
    with pytest.raises(ValueError, match=r"teacher .* gives 4x4 .* student gives 8x8.*student patch size 8"):
        check_token_grid(teacher, (8, 8), 32)


def test_build_is_seeded_and_save_round_trips(tmp_path):
    config = dict(image_size=16, patch_size=4, width=32, layers=1, heads=2, mlp_ratio=2, output_dim=8)
    first, second = build_clip_teacher(config, seed=3), build_clip_teacher(config, seed=3)
    other = build_clip_teacher(config, seed=4)
    assert isinstance(first, ClipTeacher) and first.quick_gelu  # flat configs default to QuickGELU
    assert torch.equal(first.visual.proj, second.visual.proj)
    assert not torch.equal(first.visual.proj, other.visual.proj)
    images = torch.randn(2, 3, 16, 16)
    path = save_clip_teacher(first, tmp_path / "mini")
    assert read_config(path)["kind"] == "teacher"
    assert torch.equal(load_clip_teacher(path)(images), first(images))
    with pytest.raises(ValueError, match=r"unknown keys \{'widht': \['width'\]\}"):
        build_clip_teacher({**config, "widht": 32})


def test_vit_b16_grid_differs_from_patch14_student():
    teacher = build_clip_teacher("ViT-B-16", seed=0)  # GELU name: also logs the QuickGELU warning
    assert (teacher.grid_size, teacher.embed_dim, teacher.image_size) == ((14, 14), 512, 224)
    with pytest.raises(ValueError, match=r"gives 14x14 .* student gives 16x16 .* student patch size 16"):
        check_token_grid(teacher, (16, 16), 224)


def test_a_flyeva_eva_clip_folder_is_a_teacher(tmp_path):
    """The miniature world's teacher: `flyeva clip train`'s EVA vision tower, head on final-norm tokens."""
    from flyeva.tasks.clip.model import ClipModelSection, TextSection, VisionSection, build_clip, save_clip

    cfg = ClipModelSection(
        embed_dim=24,
        vision=VisionSection(size="miniature"),
        text=TextSection(width=32, heads=2, layers=1, context_length=16, quick_gelu=False),
    )
    torch.manual_seed(0)
    clip = build_clip(cfg).eval()
    save_clip(clip, cfg, tmp_path / "final")
    teacher = load_clip_teacher(tmp_path / "final")
    assert (teacher.grid_size, teacher.patch_size, teacher.image_size) == ((8, 8), 4, 32)
    assert teacher.embed_dim == 24
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = clip.visual.head(clip.visual.forward_features(images)[:, 1:])
    assert torch.allclose(teacher(images), expected, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    check_token_grid(teacher, (8, 8), 32)
    with pytest.raises(ValueError, match="flyeva-clip:final"):
        check_token_grid(teacher, (16, 16), 32)


def test_inplace_quick_gelu_equals_open_clips_formula():
    from open_clip.transformer import QuickGELU

    from flyeva.teachers.clip import InplaceQuickGELU

    x = torch.randn(4, 7, 96, generator=torch.Generator().manual_seed(0)) * 4
    reference = QuickGELU()(x)
    with torch.inference_mode():
        fast = InplaceQuickGELU()(x.clone())
    assert torch.allclose(fast, reference, rtol=1e-6, atol=1e-6)
    # With autograd on it must not write into its input (autograd may have saved it).
    y = x.clone().requires_grad_(True)
    assert torch.equal(InplaceQuickGELU()(y), reference)
    assert torch.equal(y.detach(), x)


def test_quick_gelu_teachers_use_the_inplace_activation(tiny):
    from open_clip.transformer import QuickGELU

    from flyeva.teachers.clip import InplaceQuickGELU

    teacher = build_clip_teacher(TINY, seed=0)
    kinds = {type(m) for m in teacher.modules()}
    assert InplaceQuickGELU in kinds and QuickGELU not in kinds


def test_teacher_precision_resolves_like_the_release(monkeypatch):
    cpu = torch.device("cpu")
    # Reduced-precision training runs the teacher in that precision (the release's autocast teacher).
    assert resolve_teacher_dtype("auto", "bf16", cpu) == torch.bfloat16
    assert resolve_teacher_dtype("auto", "fp16", cpu) == torch.float16
    # fp32 training: bf16 only where the device computes it natively.
    monkeypatch.setattr(frozen, "has_native_bf16", lambda device: True)
    assert resolve_teacher_dtype("auto", "fp32", cpu) == torch.bfloat16
    monkeypatch.setattr(frozen, "has_native_bf16", lambda device: False)
    assert resolve_teacher_dtype("auto", "fp32", cpu) == torch.float32
    # An explicit choice wins over the training precision.
    assert resolve_teacher_dtype("fp32", "bf16", cpu) == torch.float32
    assert resolve_teacher_dtype("bf16", "fp32", cpu) == torch.bfloat16
    expected = "teacher.precision must be one of auto, fp32, bf16, fp16, got 'fp8'"
    with pytest.raises(ValueError, match=re.escape(expected)):
        resolve_teacher_dtype("fp8", "fp32", cpu)


def test_a_bf16_teacher_gives_fp32_targets_close_to_fp32(tiny):
    teacher = load_clip_teacher(tiny["root"] / "clip.safetensors", TINY)
    images = tiny["images"]
    full = teacher(images)
    # The caller's autocast does not reach inside: an fp32 teacher stays exactly fp32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(teacher(images), full)

    teacher.to(torch.bfloat16)
    assert teacher.dtype == torch.bfloat16 and precision_name(teacher.dtype) == "bf16"
    half = teacher(images)
    assert half.dtype == torch.float32 and not half.is_inference() and half.shape == full.shape
    cosine = torch.nn.functional.cosine_similarity(half, full, dim=-1)
    # bf16 keeps 8 mantissa bits: measured min 0.9999 here; the loss is a cosine, so this is what it sees.
    assert cosine.min() > 0.999, cosine.min()
    assert (half - full).abs().max() > 0  # it really ran in bf16
