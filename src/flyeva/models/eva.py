"""The EVA encoder: timm's `Eva` (EVA-01's blocks) plus the [MASK] token and the regression head that
masked image modeling needs, under the release's parameter names (docs/recipes.md §2)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.eva import Eva
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class EvaSize:
    """Architecture of one named encoder size (docs/recipes.md §2)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


# docs/recipes.md §2: EVA-g (paper), EVA-L (release), Ti/S/B for experiments; `miniature` for CPU runs.
EVA_SIZES: dict[str, EvaSize] = {
    "miniature": EvaSize(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_dim=384),
    "eva_tiny": EvaSize(img_size=224, patch_size=14, embed_dim=192, depth=12, num_heads=3, mlp_dim=768),
    "eva_small": EvaSize(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "eva_base": EvaSize(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "eva_large": EvaSize(img_size=224, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "eva_giant": EvaSize(img_size=224, patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144),
}

# timm model names with the same architecture (EVA-01 in timm exists only at giant size).
TIMM_EQUIVALENTS: dict[str, str] = {"eva_giant": "eva_giant_patch14_224"}

INIT_STD = 0.015  # docs/recipes.md §2: truncated normal std 0.015, truncated at +-1 std
# docs/recipes.md §2: the release's fine-tuning and EVA-CLIP towers use std 0.02 and leave the patch
# embedding at PyTorch's Conv2d default.
FINETUNE_INIT_STD = 0.02
FINETUNE_INIT_BOUND = 2.0  # timm's trunc_normal_ default (a=-2, b=2), which the fine-tuning model imports
TEACHER_DIM = 768  # docs/recipes.md §3: CLIP ViT-L/14 features after `proj`


def get_size(name: str) -> EvaSize:
    """Look up a named size; unknown names list the valid ones."""
    if name not in EVA_SIZES:
        raise ValueError(f"unknown EVA size {name!r}; choose one of {', '.join(EVA_SIZES)}")
    return EVA_SIZES[name]


def eva_kwargs(size: EvaSize, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of timm's `Eva` for a named size (no head, final norm on all tokens)."""
    kwargs = dict(
        img_size=size.img_size,
        patch_size=size.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_dim / size.embed_dim,
        qkv_bias=True,  # BEiT-style separate q_bias / v_bias, k bias fixed at zero
        num_classes=0,
        global_pool="token",
        use_fc_norm=False,  # keep the release's final `norm` on every token
    )
    kwargs.update(overrides)
    return kwargs


@torch.no_grad()
def trunc_normal_release_(
    tensor: torch.Tensor, std: float = INIT_STD, bound: float | None = None
) -> torch.Tensor:
    """normal(0, std) truncated at +-bound (default +-1 std, the MIM model's own `trunc_normal_`).

    Exact rejection sampling: ~60x faster on CPU than `nn.init.trunc_normal_`'s erfinv (20 s for
    EVA-B), since 68% of draws land inside +-1 std and only the rest are drawn again.
    """
    if tensor.is_meta:
        return tensor
    bound = std if bound is None else bound
    tensor.normal_(0.0, std)
    outside = tensor.abs() > bound
    while count := int(outside.sum()):
        tensor[outside] = torch.randn(count, dtype=tensor.dtype, device=tensor.device) * std
        outside = tensor.abs() > bound
    return tensor


@torch.no_grad()
def init_release_weights(
    model: Eva, std: float = INIT_STD, patch_embed: bool = True, bound: float | None = None
) -> None:
    """Initialise like the EVA release (docs/recipes.md §2), then rescale residual outputs; the MIM
    model re-initialises the patch embedding too (BEiT's pretraining init)."""
    convolutions = (nn.Conv2d, nn.Conv3d) if patch_embed else ()
    for module in model.modules():
        if isinstance(module, (nn.Linear, *convolutions)):
            trunc_normal_release_(module.weight, std, bound)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for name in ("pos_embed", "cls_token", "mask_token"):
        param = getattr(model, name, None)
        if param is not None:
            trunc_normal_release_(param, std, bound)
    for layer_id, block in enumerate(model.blocks, start=1):
        if block.attn.q_bias is not None:
            nn.init.zeros_(block.attn.q_bias)
            nn.init.zeros_(block.attn.v_bias)
        # Residual branches are divided by sqrt(2 * layer_id), layer_id from 1 (BEiT `fix_init_weight`).
        block.attn.proj.weight.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.div_(math.sqrt(2.0 * layer_id))


def init_finetune_weights(model: Eva) -> None:
    """The release's fine-tuning / EVA-CLIP tower init: N(0, 0.02) cut at +-2 (timm's `trunc_normal_`, a
    plain normal), patch embedding left at PyTorch's default; the MIM init stalls a from-scratch
    miniature (docs/demo.md)."""
    init_release_weights(model, std=FINETUNE_INIT_STD, patch_embed=False, bound=FINETUNE_INIT_BOUND)


class EvaForMIM(Eva):
    """EVA encoder with a [MASK] token and an `lm_head` regressing teacher features.

    The mask blends the token in after patch embedding and before the CLS token and position
    embedding, so masked positions still get their position (docs/recipes.md §3).
    """

    def __init__(self, teacher_dim: int = TEACHER_DIM, **timm_kwargs: Any) -> None:
        super().__init__(**timm_kwargs)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.lm_head = nn.Linear(self.embed_dim, teacher_dim)
        self.teacher_dim = teacher_dim
        # The release decays mask_token (its no_weight_decay is {pos_embed, cls_token}); docs/recipes.md.
        self.decay_mask_token = True

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | (set() if self.decay_mask_token else {"mask_token"})

    def _blend_mask(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[0] != x.shape[0] or mask[0].numel() != math.prod(x.shape[1:-1]):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit {x.shape[0]} images of "
                f"{math.prod(x.shape[1:-1])} patches; build masks on the model's grid "
                f"{tuple(self.patch_embed.grid_size)}"
            )
        weight = mask.reshape(*x.shape[:-1], 1).to(x.dtype)
        return x * (1 - weight) + self.mask_token.to(x.dtype) * weight

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All tokens (CLS first) after the final norm; `mask` [B, num_patches] bool selects [MASK]."""
        x = self.patch_embed(x)
        if mask is not None:
            x = self._blend_mask(x, mask)
        x, _ = self._pos_embed(x)
        x = self.norm_pre(x)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Predicted teacher features at the masked positions only: [num_masked_total, teacher_dim].

        `mask=None` masks nothing and predicts every patch of every image, in row-major order: feature
        distillation, the paper's Table 2 baseline.
        """
        tokens = self.forward_features(x, mask)[:, self.num_prefix_tokens :]
        if mask is None:
            return self.lm_head(tokens.flatten(0, 1))
        return self.lm_head(tokens[mask.reshape(mask.shape[0], -1)])


def build_mim_model(
    size: str | EvaSize = "eva_giant",
    *,
    teacher_dim: int = TEACHER_DIM,
    drop_path_rate: float = 0.1,
    grad_checkpointing: bool = False,
    release_init: bool = True,
    **overrides: Any,
) -> EvaForMIM:
    """An `EvaForMIM` of a named size; `overrides` go to timm's `Eva` (e.g. img_size)."""
    size = get_size(size) if isinstance(size, str) else size
    # docs/recipes.md §2: drop path 0.1, linear from 0 over depth.
    kwargs = eva_kwargs(size, drop_path_rate=drop_path_rate, **overrides)
    model = EvaForMIM(teacher_dim=teacher_dim, **kwargs)
    if release_init:
        init_release_weights(model)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def build_encoder(
    size: str | EvaSize = "eva_giant",
    *,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
    release_init: bool = True,
    **overrides: Any,
) -> Eva:
    """A plain timm `Eva` encoder of a named size (no mask token, no head), with the fine-tuning init."""
    size = get_size(size) if isinstance(size, str) else size
    model = Eva(**eva_kwargs(size, drop_path_rate=drop_path_rate, **overrides))
    if release_init:
        init_finetune_weights(model)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def size_with(size: str | EvaSize, **changes: int) -> EvaSize:
    """A copy of a named size with some fields changed (e.g. img_size=336)."""
    size = get_size(size) if isinstance(size, str) else size
    return replace(size, **changes)


def size_arch(model: Eva) -> dict[str, Any]:
    """The `arch` of a weights folder for an encoder or MIM model (see models/weights.py)."""
    size = EvaSize(
        img_size=model.patch_embed.img_size[0],
        patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=model.blocks[0].attn.num_heads,
        mlp_dim=model.blocks[0].mlp.fc1.out_features,
    )
    arch: dict[str, Any] = {"size": asdict(size)}
    if isinstance(model, EvaForMIM):
        arch["teacher_dim"] = model.teacher_dim
    return arch


def mim_from_arch(arch: dict[str, Any]) -> EvaForMIM:
    teacher_dim = arch.get("teacher_dim", TEACHER_DIM)
    return build_mim_model(EvaSize(**arch["size"]), teacher_dim=teacher_dim, release_init=False)


def encoder_from_arch(arch: dict[str, Any]) -> Eva:
    return build_encoder(EvaSize(**arch["size"]), release_init=False)


@torch.no_grad()
def resize_patch_embed(model: Eva, new_patch_size: int, img_size: int | None = None) -> Eva:
    """Change the patch size (14 -> 16 for detection) by bicubic kernel resizing, as the release does.

    timm's `set_input_size` rebuilds the grid and re-interpolates the position embedding; the kernel
    is then overwritten with the release's plain bicubic resize (timm would use FlexiViT's pinv).
    """
    old_kernel = model.patch_embed.proj.weight.detach().clone()
    size = (img_size, img_size) if img_size else None
    model.set_input_size(img_size=size, patch_size=(new_patch_size, new_patch_size))
    new_kernel = F.interpolate(
        old_kernel.float(), size=(new_patch_size, new_patch_size), mode="bicubic", align_corners=False
    )
    model.patch_embed.proj.weight.copy_(new_kernel.to(old_kernel.dtype))
    return model


def set_image_size(model: Eva, img_size: int) -> Eva:
    """Change the input resolution (e.g. 224 -> 336/560); position embeddings are resized bicubically."""
    model.set_input_size(img_size=(img_size, img_size))
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def encoder_flops(size: EvaSize, img_size: int | None = None) -> int:
    """Forward FLOPs of one image through the encoder (2 per multiply-add; norms/softmax ignored)."""
    img_size = img_size or size.img_size
    patches = (img_size // size.patch_size) ** 2
    tokens = patches + 1
    dim, mlp = size.embed_dim, size.mlp_dim
    patch_embed = 2 * patches * dim * 3 * size.patch_size**2
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * mlp) + 2 * 2 * tokens * tokens * dim
    return patch_embed + size.depth * per_block
