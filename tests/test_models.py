"""The EVA encoder: parity with timm, parameter counts, init, and the architecture knobs."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.eva import Eva, checkpoint_filter_fn
from torch.utils.flop_counter import FlopCounterMode

from flyeva.models.eva import (
    EVA_SIZES,
    FINETUNE_INIT_STD,
    INIT_STD,
    build_encoder,
    build_mim_model,
    count_parameters,
    encoder_flops,
    resize_patch_embed,
    set_image_size,
)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def expected_encoder_params(size) -> int:
    """Hand count: patch embed, CLS, position table, blocks (q/v bias, no k bias), final norm."""
    d, m, p = size.embed_dim, size.mlp_dim, size.patch_size
    patches = size.grid_size**2
    embed = 3 * p * p * d + d + d + (patches + 1) * d
    block = 2 * 2 * d + 3 * d * d + 2 * d + d * d + d + d * m + m + m * d + d
    return embed + size.depth * block + 2 * d


@pytest.mark.parametrize("name", list(EVA_SIZES))
def test_parameter_counts_match_the_hand_count(name):
    size = EVA_SIZES[name]
    with torch.device("meta"):
        mim = build_mim_model(size, release_init=False)
        encoder = build_encoder(size, release_init=False)
    assert count_parameters(encoder) == expected_encoder_params(size)
    assert (
        count_parameters(mim) == expected_encoder_params(size) + size.embed_dim + size.embed_dim * 768 + 768
    )


def test_eva_giant_has_the_release_parameter_count():
    with torch.device("meta"):  # 4 GB never allocated
        model = build_mim_model("eva_giant")
    assert count_parameters(model) == 1_012_229_632
    assert next(model.parameters()).device.type == "meta"


@pytest.mark.parametrize("name", ["eva_tiny", "eva_base"])
def test_features_match_timm_eva_loaded_with_the_same_weights(name):
    torch.manual_seed(0)
    size = EVA_SIZES[name]
    ours = build_mim_model(name, drop_path_rate=0.0).eval()
    # timm's own model and its own filter (MIM keys dropped, norm -> fc_norm), avg pool as timm ships EVA.
    reference = Eva(
        img_size=size.img_size,
        patch_size=size.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_dim / size.embed_dim,
        num_classes=0,
    ).eval()
    reference.load_state_dict(checkpoint_filter_fn(ours.state_dict(), reference))
    images = torch.randn(2, 3, size.img_size, size.img_size)
    with torch.no_grad():
        expected = reference.fc_norm(reference.forward_features(images))
        got = ours.forward_features(images)
    assert relative_error(got, expected) < 1e-5


def test_mim_forward_with_an_empty_mask_equals_the_plain_encoder():
    torch.manual_seed(0)
    mim = build_mim_model("miniature", drop_path_rate=0.0).eval()
    encoder = build_encoder("miniature").eval()
    encoder.load_state_dict(
        {
            k: v
            for k, v in mim.state_dict().items()
            if k not in ("mask_token",) and not k.startswith("lm_head")
        }
    )
    images = torch.randn(3, 3, 32, 32)
    empty = torch.zeros(3, 64, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(mim.forward_features(images, empty), encoder.forward_features(images))
        assert torch.equal(mim.forward_features(images, None), encoder.forward_features(images))


def test_masked_positions_see_the_mask_token_plus_their_position():
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0).eval()
    model.blocks = torch.nn.ModuleList()  # no blocks: tokens are embed + pos, then the final norm
    images = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, 5] = True
    tokens = model.forward_features(images, mask)
    expected = model.norm(model.mask_token[0, 0] + model.pos_embed[0, 1 + 5])
    assert torch.allclose(tokens[0, 1 + 5], expected, atol=1e-6)
    unmasked = model.norm(model.patch_embed(images)[0, 6] + model.pos_embed[0, 1 + 6])
    assert torch.allclose(tokens[0, 1 + 6], unmasked, atol=1e-6)
    # The head sees the masked tokens only.
    assert model(images, mask).shape == (1, 768)


def test_mask_of_the_wrong_size_is_a_clear_error():
    model = build_mim_model("miniature")
    with pytest.raises(ValueError, match="does not fit 2 images of 64 patches"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2, 49, dtype=torch.bool))


def test_release_initialisation():
    torch.manual_seed(0)
    model = build_mim_model("eva_small")
    # +-1 std truncation: the std of N(0, s) truncated at +-s is s * 0.5376 (hand computed).
    truncated_std = INIT_STD * math.sqrt(
        1 - 2 * math.exp(-0.5) / math.sqrt(2 * math.pi) / math.erf(1 / math.sqrt(2))
    )
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= INIT_STD
    assert abs(qkv.std().item() / truncated_std - 1) < 0.01
    for tensor in (
        model.pos_embed,
        model.cls_token,
        model.mask_token,
        model.lm_head.weight,
        model.patch_embed.proj.weight,
    ):
        assert tensor.abs().max() <= INIT_STD and tensor.std() > 0.5 * truncated_std
    for layer_id, block in enumerate(model.blocks, start=1):
        limit = INIT_STD / math.sqrt(2 * layer_id)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert weight.abs().max() <= limit + 1e-9
            assert abs(weight.std().item() / (truncated_std / math.sqrt(2 * layer_id)) - 1) < 0.02
        assert torch.count_nonzero(block.attn.q_bias) == 0 and torch.count_nonzero(block.attn.v_bias) == 0
        assert torch.count_nonzero(block.mlp.fc1.bias) == 0 and torch.equal(
            block.norm1.weight, torch.ones(384)
        )
    assert torch.count_nonzero(model.lm_head.bias) == 0
    assert torch.equal(model.blocks[0].attn.k_bias, torch.zeros(384))


def test_drop_path_is_linear_over_depth():
    model = build_mim_model("eva_tiny", drop_path_rate=0.3)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.3 * i / 11 for i in range(12)])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = build_mim_model("miniature", drop_path_rate=0.0)
    checkpointed = build_mim_model("miniature", drop_path_rate=0.0, grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    images, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 64) < 0.4
    plain(images, mask).square().sum().backward()
    checkpointed(images, mask).square().sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_attention_goes_through_fused_sdpa(monkeypatch):
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    model = build_mim_model("miniature")
    model(torch.randn(1, 3, 32, 32), torch.zeros(1, 64, dtype=torch.bool))
    assert len(calls) == 4  # one per block


def test_input_size_change_interpolates_position_embedding_bicubically():
    model = build_mim_model("miniature")
    old = model.pos_embed.detach().clone()
    set_image_size(model, 48)
    assert model.patch_embed.grid_size == (12, 12) and model.pos_embed.shape == (1, 145, 96)
    expected = resample_abs_pos_embed(old, new_size=(12, 12), old_size=(8, 8), num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), expected)
    assert model(torch.randn(1, 3, 48, 48), torch.zeros(1, 144, dtype=torch.bool)).shape == (0, 768)


def test_patch_size_change_resizes_the_kernel_bicubically():
    model = build_mim_model("eva_tiny")
    old = model.patch_embed.proj.weight.detach().clone()
    resize_patch_embed(model, 16)
    expected = F.interpolate(old, size=(16, 16), mode="bicubic", align_corners=False)
    assert torch.equal(model.patch_embed.proj.weight.detach(), expected)
    assert model.patch_embed.grid_size == (14, 14) and model.pos_embed.shape == (1, 197, 192)
    assert model.forward_features(torch.randn(1, 3, 224, 224)).shape == (1, 197, 192)


def test_flop_formula_matches_torch_flop_counter():
    size = EVA_SIZES["eva_tiny"]
    model = build_encoder(size, release_init=False).eval()
    for block in model.blocks:
        block.attn.fused_attn = False  # the counter does not see inside CPU SDPA kernels; count the matmuls
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_features(torch.randn(1, 3, 224, 224))
    assert counter.get_total_flops() == encoder_flops(size)


def test_encoders_use_the_release_fine_tuning_init():
    # The release's fine-tuning and EVA-CLIP towers call timm's trunc_normal_(std=0.02), cut at +-2
    # absolute: a plain N(0, 0.02), not the MIM model's cut at +-1 std (std 0.5376 x 0.02). The patch
    # embedding keeps PyTorch's Conv2d default (kaiming uniform, bound 1/sqrt(fan_in)).
    torch.manual_seed(0)
    model = build_encoder("eva_small")
    qkv = model.blocks[0].attn.qkv.weight  # 442,368 draws: the largest is about 4.8 std
    assert abs(qkv.std().item() / FINETUNE_INIT_STD - 1) < 0.01
    assert qkv.abs().max() > 4 * FINETUNE_INIT_STD
    assert abs(model.pos_embed.std().item() / FINETUNE_INIT_STD - 1) < 0.05
    patch = model.patch_embed.proj.weight
    bound = 1 / math.sqrt(patch[0].numel())  # 1 / sqrt(3 * 14 * 14)
    assert patch.abs().max() <= bound and patch.abs().max() > 0.99 * bound
    assert abs(patch.std().item() / (bound / math.sqrt(3)) - 1) < 0.01
    for layer_id, block in enumerate(model.blocks, start=1):
        fc2_std = block.mlp.fc2.weight.std().item()
        assert abs(fc2_std / (FINETUNE_INIT_STD / math.sqrt(2 * layer_id)) - 1) < 0.02


def test_the_readme_python_example_runs_as_written_and_its_mask_counts_hold(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)  # the example saves weights/eva_base in the working folder
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    counts = namespace["masks"].sum(dim=1).tolist()
    assert counts == [102, 105] and "# 102 and 105 of 256" in code
    assert namespace["predicted"].shape == (102 + 105, 768)
    assert (tmp_path / "weights" / "eva_base" / "model.safetensors").is_file()
