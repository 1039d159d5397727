"""One EVA MIM pretraining step, flyeva's against the EVA release's own code, at equal fp32 work (CPU).

    python benchmarks/mim_release_step.py --threads 2                  # eva_base, batch 8, 3 timed steps
    python benchmarks/mim_release_step.py --threads 2 --profile 25     # + top ops of one flyeva step
    python benchmarks/mim_release_step.py --profile 25 --profile-arm both
    python benchmarks/mim_release_step.py --size eva_tiny --batch 2 --steps 1 --warmup 0 --threads 1
    python benchmarks/mim_release_step.py --size eva_tiny --batch 2 --check   # same weights, same outputs?

The release arm is a copy of baaivision/EVA (MIT License), folder eva/ (now EVA-01/eva/) at commits
0494818 (modeling_pretrain.py, engine_for_pretraining.py) and 1f16c62 (modeling_finetune.py):
`VisionTransformerForMaskedImageModeling` from eva/modeling_pretrain.py with the `Block`, `Attention`,
`Mlp`, `PatchEmbed` and `LayerNormWithForceFP32` it imports from eva/modeling_finetune.py (timm's
`drop_path`, `to_2tuple`, `trunc_normal_` from `timm.layers`), trimmed to the branches its pretraining
takes; the step is the loop body of `train_one_epoch` in eva/engine_for_pretraining.py, with
`compute_loss` copied, and AdamW as eva/optim_factory.py's `create_optimizer` builds it (torch's default
implementation: a for-loop on CPU).

What one step is, in both arms: block masks for the batch (~40% of the grid, the release's 105 of 256;
the same masks in both arms: flyeva's `BlockMaskGenerator` seeded by step, which the release draws in
its data loader instead), the student forward on the masked images, the teacher forward on the
unmasked ones, the negative cosine loss on the masked tokens, backward, gradient clipping at 3.0, the
AdamW step (weight decay 0.05 except 1-D parameters, biases, pos_embed and cls_token; betas 0.9/0.98,
eps 1e-6) and zero_grad. Both arms
use the same frozen teacher: flyeva's `build_clip_teacher` (random init, seed 0, fp32; default the
open_clip ViT-B-16-quickgelu tower) under `inference_mode`, so the teacher's work is equal and the
difference is the student, the loss and the optimizer. Same batch (randn, seed 0) in both arms.

Student: the `--size` EVA size at the teacher's patch size and resolution (eva_base: 768 wide, 12 blocks,
12 heads, patch 16 at 224, 14x14 tokens), the release's pretraining settings in both arms: drop path 0.1
(linear over depth), layer scale off (ls=0.0 in the release's pretraining command; flyeva's timm `Eva` has
none), absolute position embedding, no relative position bias, qkv bias, LayerNorm eps 1e-6, init std
0.015. flyeva's arm is `build_mim_model` + `MIMObjective` + `build_adamw` (fused) as pretrain_step.py
builds it; `--malloc engine` (default) lets glibc keep freed memory in flyeva's arm only, as flyeva's
engine does on CPU. Each arm runs in its own process, so its peak RSS (ru_maxrss) is its own: teacher,
student, optimizer state, activations.

Printed: torch version and threads, the fp32 matmul ceiling at those threads (best of before and after
the arms), per arm the median s/step, the fastest step, images/s, GFLOP/s (the step's FLOPs as in
pretrain_step.py: 3x the student forward, the teacher forward; the same for both arms) and its share of
the ceiling, peak RSS, the first step's loss (the arms' random inits differ, so their losses do too;
`--check` loads flyeva's weights into the release model and compares outputs and gradients); then
speed-up = release s/step / flyeva s/step and memory ratio = flyeva peak / release peak, and the 1-minute
load average before and after. `--profile N` then prints the top N ops by self CPU time of one step
(`--profile-arm`) and the share of self time in matmul-like kernels (mm, addmm, bmm, baddbmm, the SDPA
CPU kernels, convolution) against the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import drop_path, to_2tuple
from timm.layers import trunc_normal_ as _timm_trunc_normal_
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops, peak_memory_mib
from pretrain_step import MASK_RATIO, build_optimizer, build_teacher, teacher_flops_per_image

from flyeva.data.masking import BlockMaskGenerator, generate_masks
from flyeva.engine.loop import keep_freed_memory
from flyeva.engine.optim import OptimConfig
from flyeva.models.eva import (
    EVA_SIZES,
    INIT_STD,
    EvaSize,
    build_mim_model,
    encoder_flops,
    get_size,
    size_with,
)
from flyeva.pretrain.objective import MIMObjective, mim_loss
from flyeva.teachers import check_token_grid

ARMS = ("release", "flyeva")
DROP_PATH = 0.1  # the release's --drop_path default and pretraining command; flyeva's build_mim_model default
CLIP_GRAD = OptimConfig().clip_grad  # 3.0 in both: the release's --clip_grad 3.0
PROFILE_STEP = 1000  # the profiled step's mask seed, apart from the timed steps'
MATMUL_LIKE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


# ------------------------------------------------------------------------------------------------------
# The release's student. Copied from baaivision/EVA eva/modeling_finetune.py (BEiT's, (c) 2021 Microsoft,
# commit 1f16c62) and eva/modeling_pretrain.py ((c) 2022 BAAI, commit 0494818), MIT License; the folder is
# EVA-01/eva/ today. Trimmed to the pretraining path: no relative position bias, no post-norm, no layer
# scale (ls=0.0), no gradient checkpointing, no stop_grad_conv1; the ops and their order are the release's.
# ------------------------------------------------------------------------------------------------------


def release_trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> None:
    _timm_trunc_normal_(tensor, mean=mean, std=std, a=-std, b=std)


class LayerNormWithForceFP32(nn.Module):
    def __init__(self, normalized_shape: int, eps: float = 1e-5) -> None:
        super().__init__()
        if isinstance(normalized_shape, numbers.Integral):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.Tensor(*normalized_shape))
        self.bias = nn.Parameter(torch.Tensor(*normalized_shape))
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        ).type_as(x)


class DropPath(nn.Module):
    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.act(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        all_head_dim = head_dim * self.num_heads
        self.scale = qk_scale or head_dim**-0.5
        self.qkv = nn.Linear(dim, all_head_dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(all_head_dim))
            self.v_bias = nn.Parameter(torch.zeros(all_head_dim))
        else:
            self.q_bias = None
            self.v_bias = None
        self.qk_float = True
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(all_head_dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        qkv_bias = None
        if self.q_bias is not None:
            qkv_bias = torch.cat(
                (self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias)
            )
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        qkv = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        if self.qk_float:
            attn = q.float() @ k.float().transpose(-2, -1)
        else:
            attn = q @ k.transpose(-2, -1)
        if rel_pos_bias is not None:
            attn = attn + rel_pos_bias.type_as(attn)
        attn = attn.softmax(dim=-1).type_as(x)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class Block(nn.Module):
    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float, norm_layer
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rel_pos_bias=rel_pos_bias))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        img_size, patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.patch_shape = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = self.patch_shape[0] * self.patch_shape[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        _, _, height, width = x.shape
        assert (height, width) == self.img_size, "input size does not match the model"
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformerForMaskedImageModeling(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer=None,
        init_std: float = 0.02,
        predict_feature_dim: int = 768,
    ) -> None:
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)
        self.rel_pos_bias = None
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.init_std = init_std
        self.lm_head = nn.Linear(embed_dim, predict_feature_dim)
        release_trunc_normal_(self.pos_embed, std=self.init_std)
        release_trunc_normal_(self.cls_token, std=self.init_std)
        release_trunc_normal_(self.mask_token, std=self.init_std)
        release_trunc_normal_(self.lm_head.weight, std=self.init_std)
        self.apply(self._init_weights)
        self.fix_init_weight()

    def fix_init_weight(self) -> None:
        for layer_id, layer in enumerate(self.blocks):
            layer.attn.proj.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))
            layer.mlp.fc2.weight.data.div_(math.sqrt(2.0 * (layer_id + 1)))

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            release_trunc_normal_(m.weight, std=self.init_std)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x, bool_masked_pos=bool_masked_pos)
        batch_size, seq_len, _ = x.size()
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        mask_token = self.mask_token.expand(batch_size, seq_len, -1)
        # replace the masked visual tokens by mask_token
        w = bool_masked_pos.unsqueeze(-1).type_as(mask_token)
        x = x * (1 - w) + mask_token * w
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        for blk in self.blocks:
            x = blk(x, rel_pos_bias=rel_pos_bias)
        return self.norm(x)

    def forward(self, image_input: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        image_features = self.forward_features(image_input, bool_masked_pos)
        image_features = image_features[:, 1:]
        return self.lm_head(image_features[bool_masked_pos])


def compute_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """eva/engine_for_pretraining.py's loss."""
    loss_func = nn.CosineSimilarity(dim=-1)
    loss = loss_func(output.float(), label.float())
    return -loss.mean()


def release_parameter_groups(model: nn.Module, weight_decay: float, skip_list: set[str]) -> list[dict]:
    """eva/optim_factory.py's get_parameter_groups without layer decay (pretraining passes none)."""
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias") or name in skip_list:
            group_name, this_weight_decay = "no_decay", 0.0
        else:
            group_name, this_weight_decay = "decay", weight_decay
        group = groups.setdefault(
            group_name, {"weight_decay": this_weight_decay, "params": [], "lr_scale": 1.0}
        )
        group["params"].append(param)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------------
# End of the release's code.
# ------------------------------------------------------------------------------------------------------


def release_mim_model(size: EvaSize, teacher_dim: int) -> VisionTransformerForMaskedImageModeling:
    """eva_g_patch14_224's registration at `size`, with run_eva_pretraining's get_model arguments."""
    return VisionTransformerForMaskedImageModeling(
        img_size=size.img_size,
        patch_size=size.patch_size,
        embed_dim=size.embed_dim,
        depth=size.depth,
        num_heads=size.num_heads,
        mlp_ratio=size.mlp_dim / size.embed_dim,
        qkv_bias=True,
        drop_path_rate=DROP_PATH,
        norm_layer=partial(LayerNormWithForceFP32, eps=1e-6),
        init_std=INIT_STD,  # 0.015, eva_g_patch14_224's
        predict_feature_dim=teacher_dim,
    )


def release_adamw(model: nn.Module) -> torch.optim.AdamW:
    """create_optimizer with run_eva_pretraining's defaults: adamw, wd 0.05, eps 1e-6, betas 0.9 0.98."""
    cfg = OptimConfig()
    groups = release_parameter_groups(model, cfg.weight_decay, model.no_weight_decay())
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, eps=cfg.eps, betas=list(cfg.betas))


def release_step_fn(model, optimizer, teacher, generator, images) -> Callable[[int], float]:
    """The loop body of eva/engine_for_pretraining.py's train_one_epoch, fp32, one process, on CPU (where
    NativeScalerWithGradNormCount's GradScaler is disabled: backward, clip, step)."""

    def step(index: int) -> float:
        # The release's masks come from its data loader; these are flyeva's arm's masks for this step.
        rng = np.random.default_rng([0, 0, index, 0, 0])
        bool_masked_pos = generate_masks(generator, images.shape[0], rng)
        with torch.no_grad():
            clip_features = teacher(images)
            bool_masked_pos = bool_masked_pos.flatten(1).to(torch.bool)
            labels = clip_features[bool_masked_pos]
        outputs = model(images, bool_masked_pos=bool_masked_pos)
        loss = compute_loss(outputs, labels)
        loss_value = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        optimizer.step()
        optimizer.zero_grad()
        return loss_value

    return step


def flyeva_step_fn(model, optimizer, teacher, generator, images) -> Callable[[int], float]:
    """pretrain_step.py's train_step in fp32: MIMObjective (masks, student, teacher, loss), backward,
    clip, fused AdamW."""
    objective = MIMObjective(teacher, generator, model.patch_embed.patch_size[0])

    def step(index: int) -> float:
        ctx = types.SimpleNamespace(seed=0, epoch=0, step=index, micro=0, rank=0)
        loss, _ = objective(model, {"images": images}, ctx)
        loss_value = loss.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_GRAD)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value

    return step


def build_shared(args: argparse.Namespace) -> tuple[nn.Module, EvaSize, BlockMaskGenerator, torch.Tensor]:
    """The frozen fp32 teacher, the student size on its grid, the mask generator and the batch."""
    teacher = build_teacher(args.teacher, torch.device("cpu"))
    size = size_with(get_size(args.size), patch_size=teacher.patch_size, img_size=teacher.image_size)
    generator = BlockMaskGenerator.from_ratio((size.grid_size, size.grid_size), MASK_RATIO)
    batch_rng = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size.img_size, size.img_size, generator=batch_rng)
    return teacher, size, generator, images


def build_arm(
    arm: str, teacher, size: EvaSize, generator, images
) -> tuple[nn.Module, Callable[[int], float]]:
    torch.manual_seed(0)
    if arm == "release":
        model = release_mim_model(size, teacher.embed_dim)
        step = release_step_fn(model, release_adamw(model), teacher, generator, images)
    else:
        model = build_mim_model(size, teacher_dim=teacher.embed_dim, drop_path_rate=DROP_PATH)
        check_token_grid(teacher, tuple(model.patch_embed.grid_size), size.img_size)
        step = flyeva_step_fn(model, build_optimizer(model, "fused"), teacher, generator, images)
    model.train()
    return model, step


def is_matmul_like(key: str) -> bool:
    return key in MATMUL_LIKE or "scaled_dot_product" in key or "convolution" in key


def profile_step(step: Callable[[int], float], rows: int) -> str:
    """Top `rows` ops of one step by self CPU time, and the matmul-like share of all self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(PROFILE_STEP)
    events = prof.key_averages()
    total_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    matmul = sorted(
        ((e.self_cpu_time_total / 1e3, e.key) for e in events if is_matmul_like(e.key)), reverse=True
    )
    matmul_ms = sum(ms for ms, _ in matmul)
    lines = [
        f"self CPU time of one step: {total_ms:.0f} ms; matmul-like {matmul_ms:.0f} ms "
        f"({100 * matmul_ms / total_ms:.1f}%), the rest {total_ms - matmul_ms:.0f} ms "
        f"({100 * (1 - matmul_ms / total_ms):.1f}%)",
        "matmul-like ops: " + ", ".join(f"{key} {ms:.0f} ms" for ms, key in matmul),
        events.table(sort_by="self_cpu_time_total", row_limit=rows),
    ]
    return "\n".join(lines)


def step_gflops_per_image(teacher, size: EvaSize, generator: BlockMaskGenerator, images) -> float:
    """pretrain_step.py's count: 3x the student forward and the masked lm_head, plus the teacher forward."""
    masks = generate_masks(generator, images.shape[0], np.random.default_rng([0, 0, 0, 0, 0]))
    masked_per_image = masks.sum().item() / images.shape[0]
    student = 3 * encoder_flops(size) + 3 * 2 * masked_per_image * size.embed_dim * teacher.embed_dim
    return (student + teacher_flops_per_image(teacher, torch.device("cpu"))[0]) / 1e9


def measure_arm(args: argparse.Namespace) -> dict:
    """Build one arm in this process, time its steps, return its row."""
    if args.malloc == "keep" or (args.malloc == "engine" and args.arm == "flyeva"):
        keep_freed_memory()
    teacher, size, generator, images = build_shared(args)
    _, step = build_arm(args.arm, teacher, size, generator, images)
    torch.manual_seed(1)  # the same drop-path draws in every run of an arm
    losses, seconds = [], []
    for index in range(args.warmup + args.steps):
        start = time.perf_counter()
        losses.append(step(index))
        if index >= args.warmup:
            seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(torch.device("cpu"))  # before the profiler and the FLOP count add their own
    row = dict(
        arm=args.arm,
        step_s=statistics.median(seconds),
        best_s=min(seconds),
        images_per_s=args.batch / statistics.median(seconds),
        peak_mib=peak,
        first_loss=losses[0],
        gflops_per_image=step_gflops_per_image(teacher, size, generator, images),
        grid=size.grid_size,
        patch=size.patch_size,
        teacher=teacher.arch.name,
    )
    if args.profile and args.profile_arm in (args.arm, "both"):
        row["profile"] = profile_step(step, args.profile)
    return row


def run_check(args: argparse.Namespace) -> int:
    """flyeva's student weights in the release model: same predictions, loss and gradients?"""
    teacher, size, generator, images = build_shared(args)
    flyeva, _ = build_arm("flyeva", teacher, size, generator, images)
    release, _ = build_arm("release", teacher, size, generator, images)
    result = release.load_state_dict(flyeva.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        print(f"check skipped: names differ (missing {missing}, unexpected {unexpected})")
        return 1
    mask = generate_masks(generator, args.batch, np.random.default_rng([0, 0, 0, 0, 0]))
    targets = teacher(images)[mask]
    outputs, losses = {}, {}
    for name, model, loss_fn in (("flyeva", flyeva, mim_loss), ("release", release, compute_loss)):
        model.eval()  # drop path off: the same function in both
        outputs[name] = model(images, mask)
        losses[name] = loss_fn(outputs[name], targets)
        losses[name].backward()
    release_params = dict(release.named_parameters())
    grad_diff = max(
        (p.grad - release_params[n].grad).abs().max().item() for n, p in flyeva.named_parameters()
    )
    pred_diff = (outputs["flyeva"] - outputs["release"]).abs().max().item()
    pred_max = outputs["flyeva"].abs().max().item()
    grid = f"{size.grid_size}x{size.grid_size}"
    print(
        f"check {args.size} (patch {size.patch_size}, {grid}), batch {args.batch}, "
        f"{args.threads} thread(s), flyeva's weights in both, eval mode: "
        f"max |prediction diff| {pred_diff:.2e} (predictions up to {pred_max:.2e}), "
        f"loss flyeva {losses['flyeva'].item():.6f} / release {losses['release'].item():.6f}, "
        f"max |gradient diff| {grad_diff:.2e}"
    )
    return 0


def child_command(arm: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--json", "--arm", arm]
    for key in ("size", "teacher", "batch", "steps", "warmup", "threads", "malloc", "profile", "profile_arm"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return command


def print_table(rows: dict[str, dict], ceiling: float, args: argparse.Namespace) -> None:
    first = rows["flyeva"]
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}"
    print(
        f"torch {torch.__version__}, {threads}, fp32, CPU; "
        f"student {args.size} (patch {first['patch']}, {first['grid']}x{first['grid']} tokens, drop path "
        f"{DROP_PATH}, no layer scale), teacher {first['teacher']} fp32 shared, batch {args.batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, malloc {args.malloc}"
    )
    print(f"matmul ceiling fp32, {threads}: {ceiling:8.1f} GFLOP/s")
    print(
        f"{'arm':>8} {'s/step':>7} {'best':>6} {'img/s':>6} {'GFLOP/s':>8} {'%ceil':>5} "
        f"{'peak MiB':>8} {'loss@1':>9}  adamw"
    )
    adamw = {"release": "torch default (for-loop)", "flyeva": "fused"}
    for arm in ARMS:
        row = rows[arm]
        gflops = row["gflops_per_image"] * row["images_per_s"]
        print(
            f"{arm:>8} {row['step_s']:>7.2f} {row['best_s']:>6.2f} {row['images_per_s']:>6.2f} "
            f"{gflops:>8.1f} {100 * gflops / ceiling:>4.0f}% {row['peak_mib']:>8.0f} "
            f"{row['first_loss']:>9.5f}  {adamw[arm]}"
        )
    speedup = rows["release"]["step_s"] / rows["flyeva"]["step_s"]
    memory = rows["flyeva"]["peak_mib"] / rows["release"]["peak_mib"]
    print(
        f"flyeva/release: speed-up {speedup:.2f}x (release s/step / flyeva s/step), "
        f"memory ratio {memory:.2f} (flyeva peak / release peak)"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="eva_base", help=f"student size: {', '.join(EVA_SIZES)}")
    parser.add_argument("--teacher", default="ViT-B-16-quickgelu", help="open_clip name or JSON dict config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (the median counts)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, in every process")
    parser.add_argument(
        "--malloc",
        choices=["engine", "keep", "default"],
        default="engine",
        help="engine: glibc keeps freed memory in flyeva's arm only (its engine does, the release does not); "
        "keep / default: both arms alike",
    )
    parser.add_argument("--profile", type=int, default=0, help="print this many profiler rows of one step")
    parser.add_argument("--profile-arm", choices=["flyeva", "release", "both"], default="flyeva")
    parser.add_argument("--check", action="store_true", help="same weights in both students: compare outputs")
    parser.add_argument("--arm", choices=ARMS, help="with --json: run this arm alone in this process")
    parser.add_argument(
        "--json", action="store_true", help="print the --arm row as JSON (what the parent runs)"
    )
    args = parser.parse_args()
    problems = [
        f"--{name} must be at least {low}, got {getattr(args, name)}"
        for name, low in (("batch", 1), ("steps", 1), ("warmup", 0), ("threads", 1), ("profile", 0))
        if getattr(args, name) < low
    ]
    if args.size not in EVA_SIZES:
        problems.append(f"unknown --size {args.size!r}; choose one of {', '.join(EVA_SIZES)}")
    if args.json and args.arm is None:
        problems.append("--json needs --arm release or --arm flyeva")
    if problems:
        print(f"mim_release_step.py: {problems[0]}", file=sys.stderr)
        sys.exit(2)
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.check:
        sys.exit(run_check(args))
    if args.json:
        print(json.dumps(measure_arm(args)), flush=True)
        return

    load_before = os.getloadavg()[0]
    measure_ceiling = partial(matmul_gflops, 2048, repeats=10, dtype=DTYPES["fp32"], threads=args.threads)
    ceiling = measure_ceiling()
    rows = {}
    for arm in ARMS:
        result = subprocess.run(child_command(arm, args), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"arm {arm} failed (exit {result.returncode}); run it alone with --json --arm {arm}")
        rows[arm] = json.loads(result.stdout.strip().splitlines()[-1])
    # Before and after the arms, best of both: a busy machine only ever lowers the ceiling.
    ceiling = max(ceiling, measure_ceiling())
    print_table(rows, ceiling, args)
    # Other processes on the machine slow both arms; a load near or above the core count says so.
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")
    for arm in ARMS:
        if "profile" in rows[arm]:
            print(f"\nprofile of one {arm} step (CPU, self time)\n{rows[arm]['profile']}")


if __name__ == "__main__":
    main()
