"""EVA as a ViTDet backbone: windowed blocks with decomposed relative position, and a simple pyramid.

Parameter names follow the release (`EVA-01/det`, detectron2's ViTDet projects): `net.blocks.N.attn.
{qkv, q_bias, v_bias, rel_pos_h, rel_pos_w, proj}`, `simfp_2.0` ... so its checkpoints map by prefix.
The release's behaviour is kept where weights depend on it (paper section 4.3, release `EVA-01/det`):
- the relative-position bias is q.Rh + q.Rw with the *unscaled* q, one table per block shared by heads;
- windows are zero-padded after norm1 with no mask: padded keys get k = 0 and values v_bias;
- no CLS token and no final norm; the position table (CLS dropped) is resized to the grid every forward.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, Mlp
from torch import nn
from torch.utils.checkpoint import checkpoint

LN_EPS = 1e-6  # release `EVA-01/det`: LayerNorm eps 1e-6 in blocks and pyramid
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5)  # ViTDet's simple feature pyramid -> strides 4, 8, 16, 32 (+ P6)
REL_POS_INTERPS = ("linear", "beit")  # table resize at another grid: ViTDet's, the release's eval
BEIT_RATIO = 1.0903078  # release `EVA-01/det` get_rel_pos: the fixed ratio of its geometric spacing


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nW, window, window, C], zero-padding H and W up to multiples of `window`."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (-height) % window, (-width) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    x = x.view(batch, hp // window, window, wp // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, channels), (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, window, window, C] -> [B, H, W, C] with padding removed."""
    hp, wp = padded_hw
    batch = windows.shape[0] // (hp * wp // window // window)
    x = windows.view(batch, hp // window, wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, -1)
    return x[:, : hw[0], : hw[1]].contiguous()


@functools.lru_cache(maxsize=32)
def beit_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """[dst, src] float64 map of the release's `interp_type="beit"` table resize (EVA-01/det `get_rel_pos`).

    Source rows sit at 0, +-1, +-(1 + q), +-(1 + q + q^2) ... (BEiT's spacing, q fixed), targets at the
    integers +-(dst // 2). The release's scipy `interp1d(kind="cubic")` is a not-a-knot spline, linear
    in the table, so interpolating the identity gives the whole map. Cached: callers must not modify it.
    """
    from scipy.interpolate import make_interp_spline

    distances = np.cumsum(BEIT_RATIO ** np.arange(src // 2))
    source = np.concatenate([-distances[::-1], [0.0], distances])
    half = dst // 2
    target = np.arange(-half, half + 0.1, 1.0)
    return torch.from_numpy(make_interp_spline(source, np.eye(src), k=3)(target))


def resize_rel_pos(rel_pos: torch.Tensor, length: int, interp: str = "linear") -> torch.Tensor:
    """A [L, C] relative-position table resized to `length` rows: "linear" (ViTDet) or "beit" (release)."""
    if interp == "linear":
        resized = F.interpolate(rel_pos.float().T[None], size=length, mode="linear")
        return resized[0].T.to(rel_pos.dtype)
    if interp == "beit":
        matrix = beit_resize_matrix(rel_pos.shape[0], length).to(rel_pos.device)
        return (matrix @ rel_pos.double()).to(rel_pos.dtype)  # float64 as the release's scipy fit
    raise ValueError(f"rel_pos_interp={interp!r} is not one of {list(REL_POS_INTERPS)}")


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor, interp: str = "linear") -> torch.Tensor:
    """Relative-position embeddings [q_size, k_size, C] for one axis (ViTDet/MViTv2); a table trained for
    another size is resized (`resize_rel_pos`; "beit" is the release's 1536-px COCO and LVIS evaluation)."""
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = resize_rel_pos(rel_pos, max_dist, interp)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def _rel_pos_terms(q: torch.Tensor, rel_pos_h, rel_pos_w, hw: tuple[int, int], interp: str) -> tuple:
    """q.Rh [B, heads, H, W, kH] and q.Rw [B, heads, H, W, kW] for unscaled q [B, heads, H*W, C]."""
    height, width = hw
    table_h = get_rel_pos(height, height, rel_pos_h, interp).to(q.dtype)
    table_w = get_rel_pos(width, width, rel_pos_w, interp).to(q.dtype)
    grid_q = q.reshape(*q.shape[:2], height, width, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, table_h)
    return rel_h, torch.einsum("bnhwc,wkc->bnhwk", grid_q, table_w)


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    interp: str = "linear",
) -> torch.Tensor:
    """The additive logit bias [B, heads, H*W, H*W] = q.Rh + q.Rw for unscaled q [B, heads, H*W, C]."""
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, interp)
    bias = rel_h[..., :, None] + rel_w[..., None, :]  # [B, n, H, W, kH, kW]
    return bias.reshape(*q.shape[:2], hw[0] * hw[1], hw[0] * hw[1])


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    hw: tuple[int, int],
    interp: str = "linear",
) -> torch.Tensor:
    """softmax(q.k / sqrt(C) + q.Rh + q.Rw) v without the [heads, N, N] bias tensor.

    The bias of query i and key (kh, kw) is rel_h[i, kh] + rel_w[i, kw]: a per-key-row term plus a
    per-key-column term. It is the dot product of extra query channels (q.Rh for every key row, q.Rw
    for every key column, times sqrt(C) to undo SDPA's scale) with one-hot key channels, so SDPA runs
    maskless: its fused (flash) kernels never hold N x N scores, and memory grows linearly in pixels.
    v is zero-padded to the same width (the fused kernels want one head width) and cut back after.
    """
    height, width = hw
    batch, heads, tokens, dim = q.shape
    rel_h, rel_w = _rel_pos_terms(q, rel_pos_h, rel_pos_w, hw, interp)
    rel_h, rel_w = rel_h.reshape(batch, heads, tokens, height), rel_w.reshape(batch, heads, tokens, width)
    token = torch.arange(tokens, device=q.device)
    # [N, H + W]: key (kh, kw) -> its row and column
    one_hot = torch.cat([F.one_hot(token // width, height), F.one_hot(token % width, width)], dim=-1)
    scale = dim**-0.5
    q_wide = torch.cat([q, (rel_h / scale), (rel_w / scale)], dim=-1)
    k_wide = torch.cat([k, one_hot.to(q.dtype).expand(batch, heads, tokens, height + width)], dim=-1)
    v_wide = F.pad(v, (0, height + width))
    out = F.scaled_dot_product_attention(q_wide, k_wide, v_wide, scale=scale)
    return out[..., :dim]


def set_rel_pos_interp(module: nn.Module, interp: str) -> int:
    """Use `interp` ("linear" | "beit") for every relative-position table under `module`; returns how many."""
    if interp not in REL_POS_INTERPS:
        raise ValueError(f"rel_pos_interp={interp!r} is not one of {list(REL_POS_INTERPS)}")
    attentions = [m for m in module.modules() if isinstance(m, RelPosAttention)]
    for attention in attentions:
        attention.rel_pos_interp = interp
    return len(attentions)


class RelPosAttention(nn.Module):
    """EVA attention (q/v bias, k bias zero) with a decomposed relative-position bias through SDPA."""

    def __init__(self, dim: int, num_heads: int, input_size: tuple[int, int], rel_pos_interp: str = "linear"):
        super().__init__()
        self.num_heads = num_heads
        self.rel_pos_interp = rel_pos_interp
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        # Zero-initialised (release `EVA-01/det`): a pretrained encoder's output is unchanged at step 0.
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        batch, height, width, channels = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(x.reshape(batch, height * width, channels), self.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, -1, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        out = rel_pos_attention(q, k, v, self.rel_pos_h, self.rel_pos_w, (height, width), self.rel_pos_interp)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)
        return self.proj(out)


class WindowBlock(nn.Module):
    """A pre-norm EVA block attending within `window` x `window` windows (0 = global attention)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        window: int,
        grid: tuple[int, int],
        rel_pos_interp: str = "linear",
    ):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = RelPosAttention(dim, num_heads, (window, window) if window else grid, rel_pos_interp)
        self.drop_path = nn.Identity()  # `model.set_training_options` sets the run's drop path
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, mlp_dim, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window:  # padding after norm1, no mask: the release's padded keys are k = 0, v = v_bias
            hw = x.shape[1:3]
            x, padded_hw = window_partition(x, self.window)
        x = self.attn(x)
        if self.window:
            x = window_unpartition(x, self.window, padded_hw, hw)
        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def global_block_indices(depth: int) -> list[int]:
    """Evenly spaced global blocks, the last one global: B 2,5,8,11; L 5,11,17,23; g (40) 3,7,...,39.

    ViTDet uses 4 global blocks; the release's EVA-g (`EVA-01/det`) uses 10, every fourth; a model of
    fewer than 8 blocks gets depth // 2 (miniature: 1, 3).
    """
    num_global = 10 if depth == 40 else min(4, max(1, depth // 2))
    step = depth // num_global
    return list(range(step - 1, depth, step))[:num_global]


class EvaViTDet(nn.Module):
    """EVA as a plain ViTDet backbone: patch 16, no CLS, no final norm; returns [B, C, H/16, W/16]."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        pos_grid: int,
        window: int = 16,
        global_blocks: list[int] | None = None,
        rel_pos_interp: str = "linear",
    ):
        super().__init__()
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))  # CLS row unused
        self.global_blocks = list(global_blocks if global_blocks is not None else global_block_indices(depth))
        grid = (img_size // patch_size, img_size // patch_size)
        self.blocks = nn.ModuleList(
            WindowBlock(embed_dim, num_heads, mlp_dim, 0 if i in self.global_blocks else window, grid)
            for i in range(depth)
        )
        set_rel_pos_interp(self, rel_pos_interp)
        self.grad_checkpointing = False

    def abs_pos(self, height: int, width: int) -> torch.Tensor:
        """The position table without CLS, bicubically resized to the grid: [1, H, W, C]."""
        table = self.pos_embed[:, 1:]
        side = int(math.sqrt(table.shape[1]))
        table = table.reshape(1, side, side, -1)
        if (side, side) != (height, width):
            resized = F.interpolate(
                table.permute(0, 3, 1, 2).float(), size=(height, width), mode="bicubic", align_corners=False
            )
            table = resized.permute(0, 2, 3, 1).to(table.dtype)
        return table

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(images).permute(0, 2, 3, 1)  # [B, H, W, C]
        x = x + self.abs_pos(x.shape[1], x.shape[2])
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)


def _pyramid_stage(scale: float, dim: int, out_channels: int) -> nn.Sequential:
    """ViTDet's `simfp_*` layers for one scale (same indices, so release keys match)."""
    layers: list[nn.Module] = []
    channels = dim
    if scale == 4.0:
        up = [nn.ConvTranspose2d(dim, dim // 2, 2, 2), LayerNorm2d(dim // 2, eps=LN_EPS), nn.GELU()]
        layers, channels = [*up, nn.ConvTranspose2d(dim // 2, dim // 4, 2, 2)], dim // 4
    elif scale == 2.0:
        layers, channels = [nn.ConvTranspose2d(dim, dim // 2, 2, 2)], dim // 2
    elif scale == 0.5:
        layers = [nn.MaxPool2d(2, 2)]
    elif scale != 1.0:
        raise ValueError(f"pyramid scale {scale} is not one of {PYRAMID_SCALES}")
    # detectron2 Conv2d with norm: a conv without bias, then the norm, as `simfp_*.k` and `simfp_*.k.norm`
    layers += [_ConvNorm(channels, out_channels, 1), _ConvNorm(out_channels, out_channels, 3)]
    return nn.Sequential(*layers)


class _ConvNorm(nn.Conv2d):
    """detectron2's Conv2d(norm="LN"): the norm is a child `norm`, applied after the convolution."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int):
        super().__init__(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        self.norm = LayerNorm2d(out_channels, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple pyramid on the last feature map: p2-p5 (strides 4-32) and p6 (max-pool of p5).

    Levels are named by log2(stride); `scales` (relative to the patch size) may drop the finest level.
    """

    def __init__(self, net: EvaViTDet, out_channels: int = 256, scales: tuple[float, ...] = PYRAMID_SCALES):
        super().__init__()
        self.net = net
        self.out_channels = out_channels
        base = net.patch_size
        self.strides = [int(base / scale) for scale in scales] + [int(base / scales[-1] * 2)]
        for scale, stride in zip(scales, self.strides):
            self.add_module(
                f"simfp_{int(math.log2(stride))}", _pyramid_stage(scale, net.embed_dim, out_channels)
            )

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.net(images)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for stride in self.strides[:-1]:
            level = int(math.log2(stride))
            out[f"p{level}"] = getattr(self, f"simfp_{level}")(features)
        # P6 = P5 subsampled by a kernel-1, stride-2 max pool (detectron2 LastLevelMaxPool)
        out[f"p{int(math.log2(self.strides[-1]))}"] = F.max_pool2d(out[next(reversed(out))], 1, 2)
        return out
