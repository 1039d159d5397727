"""`flyeva clip` configs: the schema and its checks.

Defaults are EVA-CLIP-g's recipe where docs/recipes.md section 5 gives it (EVA-g vision, CLIP-L text,
embed 1024, fp16, ZeRO-1, global batch ~41k); the rest follows open_clip's large-batch recipes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from flyeva.config import ConfigError
from flyeva.data.sources import SourceConfig, build_sources
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.tasks.clip.model import ClipModelSection
from flyeva.tasks.clip.zeroshot import ZeroShotSection


@dataclass
class ClipDataSection:
    sources: list[SourceConfig] = field(default_factory=list)  # each with captions: docs/clip.md
    samples_per_epoch: int = 0  # required for mixtures
    # open_clip's CLIP training crop: RandomResizedCrop(scale (0.9, 1)), no flip, CLIP normalisation.
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    hflip: float = 0.0


@dataclass
class LossSection:
    micro_batch_size: int = 0  # of the feature-caching accumulation (0 = the per-rank batch in one pass)


@dataclass
class ClipConfig:
    model: ClipModelSection = field(default_factory=ClipModelSection)
    data: ClipDataSection = field(default_factory=ClipDataSection)
    loss: LossSection = field(default_factory=LossSection)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)
    optim: OptimConfig = field(
        # open_clip's schedule (EVA-CLIP trains with it): warmup lr = peak * (s + 1) / W.
        default_factory=lambda: OptimConfig(
            lr=5e-4, min_lr=0.0, weight_decay=0.05, warmup_epochs=1.0, clip_grad=0.0, warmup="linear_plus_one"
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/clip", batch_size=160, epochs=28)
    )


def _source(sections: list[SourceConfig], samples_per_epoch: int) -> Any:
    """Image-caption pairs (a ShapeWorld source defaults to 4096 scenes)."""
    if not sections:
        raise ConfigError("no training data: set data.sources (webdataset shards, a caption table or folder)")
    sections = [
        replace(s, num_samples=4096) if s.type == "shapeworld" and not s.num_samples else s for s in sections
    ]
    try:
        return build_sources(sections, samples_per_epoch, target="caption")
    except ValueError as error:
        raise ConfigError(f"data.sources: {error}") from None


def check_config(cfg: ClipConfig) -> None:
    if cfg.train.accum_steps != 1:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps} would split the contrastive batch into separate "
            "losses; set train.accum_steps=1 and loss.micro_batch_size to accumulate with cached features"
        )
    if cfg.loss.micro_batch_size < 0:
        raise ConfigError("loss.micro_batch_size must be >= 0 (0 = no accumulation)")
    if cfg.optim.layer_decay != 1.0:  # each tower has its own: optim's would be silently ignored
        raise ConfigError(
            f"optim.layer_decay={cfg.optim.layer_decay} does not apply to CLIP; set "
            "model.vision.layer_decay and/or model.text.layer_decay instead"
        )
    cfg.train.check()
