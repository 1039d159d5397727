"""The video model: the image EVA inflated to clips (paper section 4.2; release `EVA-01/video`).

Tubelet embedding (a Conv3d of kernel (t, p, p)); position table [CLS, the spatial table tiled over
the T / t slots], resized trilinearly when T changes; joint space-time attention over frame-major
tokens through timm's blocks; mean of the patch tokens -> fc_norm -> head. An inflated model is blind
to frame order and to motion inside a tubelet: `add_temporal_pos` / `add_tubelet_motion` are
flyeva's options against that (docs/video.md). Clips enter as [B, T, C, H, W], the release's layout.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn
from torch.utils.checkpoint import checkpoint

from flyeva.models.eva import EvaSize, eva_kwargs, init_finetune_weights, size_arch

HEAD_INIT_SCALE = 0.001  # release `EVA-01/video` models/beit.py: head weights x init_scale 0.001
FINAL_NORMS = ("fc_norm", "drop")


class TubeletEmbed(nn.Module):
    """[B, T, C, H, W] -> [B, (T / t) * N, D] with a Conv3d of kernel (t, p, p), frame-major tokens."""

    def __init__(self, img_size: int, patch_size: int, num_frames: int, tubelet_size: int, embed_dim: int):
        super().__init__()
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} must be a multiple of tubelet_size={tubelet_size}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(3, embed_dim, kernel_size=kernel, stride=kernel)

    @property
    def time_slots(self) -> int:
        return self.num_frames // self.tubelet_size

    @property
    def num_patches(self) -> int:
        return self.time_slots * self.grid_size[0] * self.grid_size[1]

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        batch, frames, _, height, width = clips.shape
        if (frames, height, width) != (self.num_frames, *self.img_size):
            raise ValueError(
                f"clips of {frames} x {height} x {width} do not fit the model's {self.num_frames} x "
                f"{self.img_size[0]} x {self.img_size[1]}; sample that many frames or call resize()"
            )
        if self.tubelet_size == 1:
            # One frame per slot is the image model's Conv2d on every frame: the same kernels, bit for bit.
            tokens = F.conv2d(
                clips.flatten(0, 1), self.proj.weight[:, :, 0], self.proj.bias, stride=self.patch_size
            )
            return tokens.flatten(2).transpose(1, 2).reshape(batch, -1, tokens.shape[1])
        return self.proj(clips.transpose(1, 2)).flatten(2).transpose(1, 2)


class VideoEva(Eva):
    """timm's `Eva` with a tubelet embedding and a [CLS, tiled spatial] position table, under the image
    model's and the release's parameter names (layer decay and checkpoints work unchanged)."""

    def __init__(self, num_frames: int = 16, tubelet_size: int = 1, **timm_kwargs: Any):
        super().__init__(**timm_kwargs)
        image = self.patch_embed
        self.patch_embed = TubeletEmbed(
            image.img_size[0], image.patch_size[0], num_frames, tubelet_size, self.embed_dim
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, self.embed_dim))

    @property
    def num_frames(self) -> int:
        return self.patch_embed.num_frames

    def forward_features(self, clips: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens (CLS first, then frame-major patches) after the blocks and `norm`."""
        x = self.patch_embed(clips)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(self.pos_drop(x))
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask=attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        return self.norm(x)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] (features [B, D] when the model has no head)."""
        return self.forward_head(self.forward_features(clips))

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a video model's position table is 3-D: use resize(num_frames, img_size)")

    @torch.no_grad()
    def resize(self, num_frames: int, img_size: int | None = None) -> None:
        """Take clips of `num_frames` x `img_size`: the position table is resized trilinearly, CLS kept."""
        embed = self.patch_embed
        img_size = img_size or embed.img_size[0]
        if num_frames % embed.tubelet_size or img_size % embed.patch_size[0]:
            raise ValueError(
                f"num_frames={num_frames} and img_size={img_size} must be multiples of the tubelet "
                f"({embed.tubelet_size}) and patch ({embed.patch_size[0]}) sizes"
            )
        old_shape = (embed.time_slots, *embed.grid_size)
        grid = img_size // embed.patch_size[0]
        embed.num_frames, embed.img_size, embed.grid_size = num_frames, (img_size, img_size), (grid, grid)
        table = resize_pos_embed(self.pos_embed.data, old_shape, (embed.time_slots, grid, grid))
        self.pos_embed = nn.Parameter(table)


def resize_pos_embed(
    pos_embed: torch.Tensor, old_shape: tuple[int, int, int], new_shape: tuple[int, int, int]
) -> torch.Tensor:
    """[1, 1 + T*H*W, D] -> [1, 1 + T'*H'*W', D]: trilinear (align_corners=False), CLS row unchanged, as
    the release resizes its 8-frame table to 16 frames (`EVA-01/video`)."""
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    if patches.shape[1] != math.prod(old_shape):
        raise ValueError(f"position table of {patches.shape[1]} patches does not match the grid {old_shape}")
    dim = patches.shape[-1]
    grid = patches.reshape(1, *old_shape, dim).permute(0, 4, 1, 2, 3).float()
    resized = F.interpolate(grid, size=new_shape, mode="trilinear", align_corners=False)
    resized = resized.permute(0, 2, 3, 4, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([cls, resized], dim=1)


@torch.no_grad()
def add_temporal_pos(model: VideoEva, std: float) -> None:
    """Add one N(0, std) vector per time slot to that slot's patch rows (CLS untouched): with a tiled table
    alone, joint attention and mean pooling see a clip and its frames in another order alike."""
    embed = model.patch_embed
    slots = nn.init.trunc_normal_(torch.empty(embed.time_slots, 1, model.embed_dim), std=std)
    per_token = slots.expand(-1, embed.grid_size[0] * embed.grid_size[1], -1).reshape(1, -1, model.embed_dim)
    model.pos_embed[:, 1:] += per_token.to(model.pos_embed.dtype)


@torch.no_grad()
def add_tubelet_motion(model: VideoEva, scale: float) -> None:
    """Add to an inflated tubelet kernel (blind to motion inside a tubelet) `scale` x a Conv3d-init draw
    minus its mean over the t frames: a static clip embeds exactly as the image, a moving one differs."""
    kernel = model.patch_embed.proj.weight
    if kernel.shape[2] == 1:
        return
    fresh = nn.init.kaiming_uniform_(torch.empty_like(kernel), a=math.sqrt(5))  # nn.Conv3d's default
    kernel += scale * (fresh - fresh.mean(dim=2, keepdim=True))


@torch.no_grad()
def init_head(head: nn.Module, scale: float = HEAD_INIT_SCALE) -> None:
    """The release's head init: trunc_normal(std 0.02) times `scale`, zero bias."""
    if isinstance(head, nn.Linear):
        nn.init.trunc_normal_(head.weight, std=0.02)
        head.weight.mul_(scale)
        nn.init.zeros_(head.bias)


def build_video_model(
    size: EvaSize,
    num_classes: int,
    *,
    num_frames: int = 16,
    tubelet_size: int = 1,
    drop_path_rate: float = 0.0,
    head_init_scale: float = HEAD_INIT_SCALE,
    grad_checkpointing: bool = False,
    release_init: bool = True,
) -> VideoEva:
    """A `VideoEva` of a named size; mean pooling -> fc_norm -> head as the release's video model."""
    kwargs = eva_kwargs(size, num_classes=num_classes, global_pool="avg", use_fc_norm=True)
    model = VideoEva(num_frames, tubelet_size, **{**kwargs, "drop_path_rate": drop_path_rate})
    if release_init:  # the fine-tuning init, as build_encoder: patch embedding at PyTorch's default
        init_finetune_weights(model)
        init_head(model.head, head_init_scale)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def video_arch(model: VideoEva) -> dict[str, Any]:
    """The json `arch` of a video weights folder (models/weights.py)."""
    embed = model.patch_embed
    frames = {"num_frames": embed.num_frames, "tubelet_size": embed.tubelet_size}
    return {**size_arch(model), "num_classes": model.num_classes, **frames}


def build_from_arch(arch: dict[str, Any]) -> VideoEva:
    """The `video` weights kind's builder: the architecture only, no initialisation."""
    frames = {"num_frames": arch["num_frames"], "tubelet_size": arch.get("tubelet_size", 1)}
    return build_video_model(EvaSize(**arch["size"]), arch["num_classes"], **frames, release_init=False)


def inflate_image_state(
    encoder_state: dict[str, torch.Tensor],
    num_frames: int,
    tubelet_size: int = 1,
    final_norm: str = "fc_norm",
) -> dict[str, torch.Tensor]:
    """An image encoder's weights as `VideoEva` weights without the head: what the release's 2D -> 3D
    loading intends (it fails as written). The kernel is repeated over t and divided by t (a static clip
    embeds as the image), the spatial table tiled over T / t slots; `final_norm`: fc_norm = the encoder's
    final norm becomes fc_norm (timm's choice, as `flyeva classify`), drop = a fresh fc_norm."""
    if final_norm not in FINAL_NORMS:
        raise ValueError(f"model.final_norm must be one of {', '.join(FINAL_NORMS)}, got {final_norm!r}")
    if num_frames % tubelet_size:
        raise ValueError(f"num_frames={num_frames} must be a multiple of tubelet_size={tubelet_size}")
    state = {k: v for k, v in encoder_state.items() if not k.startswith(("norm.", "head.", "fc_norm."))}
    kernel = state["patch_embed.proj.weight"]
    if kernel.ndim == 4:
        state["patch_embed.proj.weight"] = kernel.unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1) / tubelet_size
    table, slots = state["pos_embed"], num_frames // tubelet_size
    state["pos_embed"] = torch.cat([table[:, :1], table[:, 1:].repeat(1, slots, 1)], dim=1)
    if final_norm == "fc_norm":
        state.update({f"fc_{k}": v for k, v in encoder_state.items() if k.startswith("norm.")})
    return state
