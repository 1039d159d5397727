"""Detection backbone: windows, decomposed relative position, parity with timm's EVA blocks, pyramid."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_encoder

from flyeva.models.eva import build_encoder
from flyeva.tasks.detect.backbone import (
    EvaViTDet,
    SimpleFeaturePyramid,
    WindowBlock,
    decomposed_rel_pos_bias,
    get_rel_pos,
    global_block_indices,
    resize_rel_pos,
    set_rel_pos_interp,
    window_partition,
    window_unpartition,
)
from flyeva.tasks.detect.model import backbone_from_encoder

torch.set_num_threads(1)
TINY = tiny_encoder(32)


def test_window_partition_round_trip_with_padding():
    x = torch.randn(2, 7, 10, 3)
    windows, padded = window_partition(x, 4)
    assert padded == (8, 12)
    assert windows.shape == (2 * 2 * 3, 4, 4, 3)
    # window (0, 1) of image 0 holds rows 0-3, columns 4-7; the padded row 7 is zero
    torch.testing.assert_close(windows[1], F.pad(x, (0, 0, 0, 2, 0, 1))[0, 0:4, 4:8])
    assert windows[-1, -1].abs().sum() == 0
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (7, 10)), x, rtol=0, atol=0)


def test_global_blocks_as_vitdet_and_the_release():
    assert global_block_indices(12) == [2, 5, 8, 11]
    assert global_block_indices(24) == [5, 11, 17, 23]
    assert global_block_indices(40) == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39]
    assert global_block_indices(4) == [1, 3]


def naive_rel_pos_bias(q, rel_h, rel_w, height, width):
    """Bias[i, j] = q_i . Rh[hi - hj + H - 1] + q_i . Rw[wi - wj + W - 1], one pair at a time."""
    batch, heads, tokens, _ = q.shape
    bias = torch.zeros(batch, heads, tokens, tokens, dtype=torch.float64)
    for i in range(tokens):
        hi, wi = divmod(i, width)
        for j in range(tokens):
            hj, wj = divmod(j, width)
            table = rel_h[hi - hj + height - 1] + rel_w[wi - wj + width - 1]
            bias[:, :, i, j] = (q[:, :, i].double() * table.double()).sum(-1)
    return bias


def test_decomposed_rel_pos_equals_naive_full_bias():
    torch.manual_seed(0)
    height, width, dim = 3, 4, 5
    q = torch.randn(2, 2, height * width, dim)
    rel_h, rel_w = torch.randn(2 * height - 1, dim), torch.randn(2 * width - 1, dim)
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (height, width))
    torch.testing.assert_close(
        bias.double(), naive_rel_pos_bias(q, rel_h, rel_w, height, width), atol=1e-5, rtol=0
    )


def vitdet_attention(block: WindowBlock, x: torch.Tensor) -> torch.Tensor:
    """ViTDet's Attention.forward (detectron2 `vit.py`), written out with explicit softmax."""
    attn = block.attn
    batch, height, width, channels = x.shape
    heads, head_dim = attn.num_heads, channels // attn.num_heads
    qkv_bias = torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    qkv = F.linear(x, attn.qkv.weight, qkv_bias).reshape(batch, height * width, 3, heads, -1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, height * width, -1).unbind(0)
    logits = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    rel_h = torch.einsum(
        "bhwc,hkc->bhwk", q.reshape(-1, height, width, head_dim), _table(attn.rel_pos_h, height)
    )
    rel_w = torch.einsum(
        "bhwc,wkc->bhwk", q.reshape(-1, height, width, head_dim), _table(attn.rel_pos_w, width)
    )
    logits = logits.view(-1, height, width, height, width) + rel_h[..., None] + rel_w[..., None, :]
    out = logits.view(-1, height * width, height * width).softmax(-1) @ v
    out = out.view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return attn.proj(out)


def _table(rel_pos, size):
    coords = torch.arange(size)[:, None] - torch.arange(size)[None, :] + size - 1
    return rel_pos[coords]


def test_sdpa_attention_with_rel_pos_matches_vitdet_reference():
    torch.manual_seed(0)
    block = WindowBlock(32, 2, 64, window=0, grid=(4, 5))
    for param in (block.attn.rel_pos_h, block.attn.rel_pos_w, block.attn.q_bias, block.attn.v_bias):
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(2, 4, 5, 32)
    torch.testing.assert_close(block.attn(x), vitdet_attention(block, x), atol=1e-5, rtol=1e-5)


def test_window_equal_to_grid_is_global_attention():
    torch.manual_seed(0)
    global_block = WindowBlock(32, 2, 64, window=0, grid=(6, 6))
    window_block = WindowBlock(32, 2, 64, window=6, grid=(6, 6))
    window_block.load_state_dict(global_block.state_dict())
    x = torch.randn(2, 6, 6, 32)
    torch.testing.assert_close(window_block(x), global_block(x), atol=1e-6, rtol=1e-6)


def test_padded_window_keys_carry_v_bias_as_the_release():
    """A 3x3 grid in 2x2 windows: the corner token's window is 1 real + 3 zero tokens (k = 0, v = v_bias)."""
    torch.manual_seed(0)
    block = WindowBlock(8, 1, 16, window=2, grid=(3, 3))
    torch.nn.init.normal_(block.attn.v_bias)
    x = torch.randn(1, 3, 3, 8)
    out = block.attn(window_partition(block.norm1(x), 2)[0])
    corner = out[3, 0, 0]  # the window holding only token (2, 2)
    attn = block.attn
    real = block.norm1(x)[0, 2, 2]
    q = F.linear(real, attn.qkv.weight[:8], attn.q_bias)
    k_real = F.linear(real, attn.qkv.weight[8:16])
    v_real = F.linear(real, attn.qkv.weight[16:], attn.v_bias)
    weights = torch.softmax(torch.stack([q @ k_real * 8**-0.5, *[torch.tensor(0.0)] * 3]), 0)
    expected = attn.proj(weights[0] * v_real + weights[1:].sum() * attn.v_bias)
    torch.testing.assert_close(corner, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [0, 8])
def test_zero_rel_pos_backbone_equals_timm_eva_blocks(window):
    """Right after loading, the backbone computes what timm's EVA blocks compute on the patch tokens."""
    torch.manual_seed(0)
    encoder = build_encoder(TINY)
    for block in encoder.blocks:
        torch.nn.init.normal_(block.attn.q_bias, std=0.1)
        torch.nn.init.normal_(block.attn.v_bias, std=0.1)
    net = backbone_from_encoder(encoder, patch_size=4, img_size=32, window=window, pos_grid=8)
    images = torch.randn(2, 3, 32, 32)
    tokens = encoder.patch_embed(images) + encoder.pos_embed[:, 1:]
    for block in encoder.blocks:
        tokens = block(tokens)
    expected = tokens.transpose(1, 2).reshape(2, 32, 8, 8)
    torch.testing.assert_close(net(images), expected, atol=1e-5, rtol=1e-5)


def test_pyramid_strides_and_shapes():
    net = EvaViTDet(64, 16, 32, 2, 2, 64, pos_grid=4, window=2)
    pyramid = SimpleFeaturePyramid(net, out_channels=24)
    features = pyramid(torch.randn(2, 3, 64, 64))
    assert pyramid.strides == [4, 8, 16, 32, 64]
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "p2": (2, 24, 16, 16),
        "p3": (2, 24, 8, 8),
        "p4": (2, 24, 4, 4),
        "p5": (2, 24, 2, 2),
        "p6": (2, 24, 1, 1),
    }
    torch.testing.assert_close(features["p6"], features["p5"][:, :, ::2, ::2])


def test_release_key_names_of_the_pyramid():
    net = EvaViTDet(64, 16, 32, 1, 2, 64, pos_grid=4)
    names = set(SimpleFeaturePyramid(net, 16).state_dict())
    for key in (
        "simfp_2.0.weight",
        "simfp_2.1.weight",
        "simfp_2.3.weight",
        "simfp_2.4.weight",
        "simfp_2.4.norm.weight",
        "simfp_2.5.norm.bias",
        "simfp_3.0.bias",
        "simfp_3.1.weight",
        "simfp_4.0.norm.weight",
        "simfp_5.1.weight",
        "net.blocks.0.attn.rel_pos_h",
        "net.pos_embed",
    ):
        assert key in names, key
    assert "simfp_2.4.bias" not in names  # detectron2's Conv2d with a norm has no bias


def test_rel_pos_table_is_resized_linearly_for_another_grid():
    table = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)  # trained for a 3-token axis
    same = get_rel_pos(3, 3, table)
    assert same.shape == (3, 3, 2)
    torch.testing.assert_close(same[0, 2], table[0])  # q 0, k 2: distance -2 -> row 0
    bigger = get_rel_pos(4, 4, table)  # a 4-token axis needs 7 rows: the table is interpolated linearly
    resized = F.interpolate(table.T[None], size=7, mode="linear")[0].T
    torch.testing.assert_close(bigger[3, 0], resized[6])
    torch.testing.assert_close(bigger[0, 3], resized[0])
    net = EvaViTDet(32, 4, 16, 2, 2, 32, pos_grid=8, window=0, global_blocks=[0, 1])
    assert net(torch.randn(1, 3, 48, 40)).shape == (1, 16, 12, 10)  # another grid than the tables': runs


def release_beit_resize(table: np.ndarray, dst_size: int) -> np.ndarray:
    """The release's `get_rel_pos(..., interp_type="beit")` resize (EVA-01/det backbone/utils.py), written
    from its description: source rows at the geometric offsets 0, +-1, +-(1 + q), ... with q = 1.0903078,
    targets at the integers -(dst // 2) ... dst // 2, one scipy `interp1d(kind="cubic",
    fill_value="extrapolate")` per channel."""
    from scipy.interpolate import interp1d

    ratio, offsets, offset = 1.0903078, [], 1.0
    for i in range(table.shape[0] // 2):
        offsets.append(offset)
        offset += ratio ** (i + 1)
    source = [-o for o in reversed(offsets)] + [0.0] + offsets
    half = dst_size // 2
    target = np.arange(-half, half + 0.1, 1.0)
    columns = [
        interp1d(source, table[:, c], kind="cubic", fill_value="extrapolate")(target)
        for c in range(table.shape[1])
    ]
    return np.stack(columns, axis=1)


@pytest.mark.parametrize("src, dst", [(13, 19), (159, 191), (31, 27)])  # 159 -> 191: EVA-g 1280 -> 1536
def test_beit_rel_pos_resize_equals_the_release_cubic_fit(src, dst):
    table = torch.randn(src, 6, generator=torch.Generator().manual_seed(src), dtype=torch.float64)
    expected = release_beit_resize(table.numpy(), dst)
    torch.testing.assert_close(resize_rel_pos(table, dst, "beit").numpy(), expected, rtol=0, atol=1e-10)
    size = (dst + 1) // 2
    rows = get_rel_pos(size, size, table.float(), "beit")
    assert rows.dtype == torch.float32
    torch.testing.assert_close(rows[0, size - 1], torch.from_numpy(expected[0]).float())  # distance -(size-1)
    torch.testing.assert_close(rows[size - 1, 0], torch.from_numpy(expected[-1]).float())
    linear = resize_rel_pos(table, dst, "linear").numpy()
    assert np.abs(linear - expected).max() > 0.1  # another fit than ViTDet's linear one


def test_beit_mode_in_a_block_equals_attention_with_the_release_resized_tables():
    torch.manual_seed(0)
    block = WindowBlock(16, 2, 32, window=0, grid=(4, 4), rel_pos_interp="beit")  # tables of 7 rows
    for param in (block.attn.rel_pos_h, block.attn.rel_pos_w):
        torch.nn.init.normal_(param, std=0.5)
    resized = WindowBlock(16, 2, 32, window=0, grid=(6, 6))  # tables of 11 rows: no resize at 6 x 6
    state = block.state_dict()
    for name in ("attn.rel_pos_h", "attn.rel_pos_w"):
        state[name] = torch.from_numpy(release_beit_resize(state[name].double().numpy(), 11)).float()
    resized.load_state_dict(state)
    x = torch.randn(2, 6, 6, 16)
    torch.testing.assert_close(block(x), resized(x), atol=1e-5, rtol=1e-5)
    block(x).sum().backward()  # the fit is linear in the table: gradients reach it
    assert block.attn.rel_pos_h.grad.abs().sum() > 0
    linear = WindowBlock(16, 2, 32, window=0, grid=(4, 4))
    linear.load_state_dict(block.state_dict())
    assert (linear(x) - block(x)).abs().max() > 1e-3


def test_rel_pos_interp_is_set_on_every_block_and_checked():
    net = EvaViTDet(32, 4, 16, 4, 2, 32, pos_grid=8, window=4, rel_pos_interp="beit")
    assert {block.attn.rel_pos_interp for block in net.blocks} == {"beit"}
    assert set_rel_pos_interp(net, "linear") == 4
    assert {block.attn.rel_pos_interp for block in net.blocks} == {"linear"}
    with pytest.raises(ValueError, match="rel_pos_interp='cubic'"):
        set_rel_pos_interp(net, "cubic")
    with pytest.raises(ValueError, match="rel_pos_interp='vitdet'"):
        EvaViTDet(32, 4, 16, 1, 2, 32, pos_grid=8, rel_pos_interp="vitdet")


@pytest.mark.parametrize(("height", "width", "interp"), [(3, 4, "linear"), (6, 6, "beit"), (5, 7, "linear")])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rel_pos_as_key_channels_equals_the_explicit_bias_with_gradients(
    height, width, interp, dtype, tolerance
):
    """The maskless form (extra q/k channels) against SDPA with the [heads, N, N] float bias: equal in
    float64 to rounding, and within 1e-5 in fp32 at a block's scales (unit q/k/v, tables of 0.1;
    gradients within 1e-5 of their largest entry, which is 4 to 111 here)."""
    from flyeva.tasks.detect.backbone import rel_pos_attention

    torch.manual_seed(0)
    dim, table = 8, 2 * 4 - 1  # a table of another size is resized, as at a 1536 test of 1280 training
    shape = (2, 3, height * width, dim)
    leaves = [torch.randn(shape, dtype=dtype).requires_grad_() for _ in range(3)]
    leaves += [(0.1 * torch.randn(table, dim, dtype=dtype)).requires_grad_() for _ in range(2)]
    q, k, v, rel_h, rel_w = leaves
    bias = decomposed_rel_pos_bias(q, rel_h, rel_w, (height, width), interp)
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    grads_reference = torch.autograd.grad(reference.square().sum(), leaves)
    out = rel_pos_attention(q, k, v, rel_h, rel_w, (height, width), interp)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=0)
    for got, want in zip(grads, grads_reference):  # gradients: within tolerance x their largest entry
        torch.testing.assert_close(got, want, atol=tolerance * max(1.0, want.abs().max().item()), rtol=0)
