"""AdamW parameter groups with the release's weight-decay rules and layer-wise lr decay, and the schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from flyeva.config import ConfigError


@dataclass
class OptimConfig:
    """AdamW and schedule; defaults are EVA's pretraining recipe (docs/recipes.md §3)."""

    lr: float = 1e-3  # peak lr at global batch 4096
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    layer_decay: float = 1.0  # 1.0 = off; transfer recipes use 0.85-0.95 (docs/recipes.md §4)
    warmup_epochs: float = 2.0
    warmup_steps: int = 0  # > 0: warmup length in optimizer steps (iteration-based recipes), not epochs
    # linspace: lr = peak * s / (W - 1), the release's np.linspace(0, peak, W) (BEiT/EVA pretraining and
    # fine-tuning); linear: peak * s / W; linear_plus_one: peak * (s + 1) / W (open_clip, EVA-CLIP);
    # factor: peak * (f + (1 - f) * s / W) with f = warmup_factor (detectron2, mmseg). docs/recipes.md.
    warmup: str = "linspace"
    warmup_factor: float = 0.001
    # cosine (to min_lr) | poly (power poly_power, to min_lr) | step (x decay_factor at each of
    # decay_steps) | constant; all per optimizer step after warmup.
    schedule: str = "cosine"
    poly_power: float = 1.0
    decay_steps: list[int] = field(default_factory=list)
    decay_factor: float = 0.1
    clip_grad: float = 3.0  # 0 = off
    # fused: one kernel per step for every parameter (CPU and CUDA), 5x faster than foreach on CPU
    # (docs/performance.md); foreach | for-loop are torch's other implementations, same math.
    implementation: str = "fused"


ADAMW_IMPLEMENTATIONS = {
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "for-loop": {"foreach": False},
}


def adamw_flags(implementation: str) -> dict[str, bool]:
    """torch.optim.AdamW keyword arguments for `optim.implementation`."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(
            f"optim.implementation={implementation!r} is not one of {sorted(ADAMW_IMPLEMENTATIONS)}"
        )
    return ADAMW_IMPLEMENTATIONS[implementation]


def layer_id_for_vit(name: str, num_layers: int) -> int:
    """Layer of a ViT parameter: embeddings 0, block i -> i + 1, everything after -> num_layers + 1."""
    if name.startswith(("cls_token", "mask_token", "pos_embed", "patch_embed", "reg_token", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """The one layer-decay grouping (docs/recipes.md §4): a model that is not a plain ViT says where its
    parameters sit with `layer_id(name, num_layers)` and `num_layers`, as timm's `group_matcher`."""
    return param_groups(
        model,
        optim.weight_decay,
        layer_decay=optim.layer_decay,
        num_layers=getattr(model, "num_layers", None),
        layer_id_fn=getattr(model, "layer_id", layer_id_for_vit),
    )


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    layer_decay: float = 1.0,
    num_layers: int | None = None,
    layer_id_fn: Callable[[str, int], int] = layer_id_for_vit,
    lr_scale: float = 1.0,
    prefix: str = "",
) -> list[dict]:
    """Groups keyed by (layer, decay): no decay on 1-D params, biases and the model's `no_weight_decay()`;
    each group's `lr_scale` = lr_scale * layer_decay ** (num_layers + 1 - layer) (docs/recipes.md §4)."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    if num_layers is None:
        num_layers = len(getattr(model, "blocks", []))
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        layer = layer_id_fn(name, num_layers) if layer_decay != 1.0 else 0
        scale = lr_scale * layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else lr_scale
        group = groups.setdefault(
            (layer, decay),
            {
                "params": [],
                "param_names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": scale,
                "layer_id": layer,
            },
        )
        group["params"].append(param)
        group["param_names"].append(prefix + name)
    return list(groups.values())


def without_names(groups: list[dict]) -> list[dict]:
    """Groups for an optimizer: `param_names` stay out so its state dict is plain tensors and numbers."""
    return [{k: v for k, v in g.items() if k != "param_names"} for g in groups]


def build_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    clean = without_names(groups)
    flags = adamw_flags(cfg.implementation)
    return torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **flags)


WARMUPS = ("linspace", "linear", "linear_plus_one", "factor")
SCHEDULES = ("cosine", "poly", "step", "constant")


def check_schedule(cfg: OptimConfig) -> None:
    """Reject unknown schedule names before any work starts."""
    if cfg.warmup not in WARMUPS:
        raise ConfigError(f"optim.warmup={cfg.warmup!r} is not one of {list(WARMUPS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.schedule!r} is not one of {list(SCHEDULES)}")


def _warmup_lr(step: int, warmup_steps: int, total_steps: int, cfg: OptimConfig) -> float:
    if cfg.warmup == "linspace":  # np.linspace(0, peak, W): the peak is reached at s = W - 1
        return cfg.lr * step / max(1, warmup_steps - 1)
    if cfg.warmup == "linear":
        return cfg.lr * step / warmup_steps
    if cfg.warmup == "linear_plus_one":
        return cfg.lr * (step + 1) / warmup_steps
    factor = cfg.warmup_factor
    return _main_lr(step, 0, total_steps, cfg) * (factor + (1 - factor) * step / warmup_steps)


def _main_lr(step: int, warmup_steps: int, total_steps: int, cfg: OptimConfig) -> float:
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.decay_factor ** sum(step >= milestone for milestone in cfg.decay_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if cfg.schedule == "poly":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - progress) ** cfg.poly_power
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, total_steps: int, warmup_steps: int, cfg: OptimConfig) -> float:
    """The base lr of optimizer step `step`: warmup from 0 (docs/recipes.md), then `cfg.schedule`.

    Cosine and poly run over the steps after warmup (the release's per-iteration cosine); `step`
    milestones count from step 0 as detectron2's do. The factor warmup multiplies the schedule.
    """
    if step < warmup_steps:
        return _warmup_lr(step, warmup_steps, total_steps, cfg)
    # detectron2 and mmseg (factor warmup): the schedule runs over all steps
    return _main_lr(step, 0 if cfg.warmup == "factor" else warmup_steps, total_steps, cfg)


def warmup_length(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Warmup in optimizer steps: `warmup_steps` when set, else `warmup_epochs` epochs."""
    return cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_epochs * steps_per_epoch)


def apply_lr(optimizer: torch.optim.Optimizer, base_lr: float) -> None:
    """Set every group's lr to base_lr times its `lr_scale` (the step a scheduler must not forget)."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * group.get("lr_scale", 1.0)
