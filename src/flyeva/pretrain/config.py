"""`flyeva pretrain` configs: the schema (defaults = EVA-g's recipe, docs/recipes.md §3) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flyeva.config import ConfigError
from flyeva.data.sources import DEFAULT_MAX_PIXELS, SourceConfig, check_source
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig, check_schedule


@dataclass
class ModelSection:
    size: str = "eva_giant"
    img_size: int = 0  # 0 = the size's own (224 for the paper's sizes)
    drop_path_rate: float = 0.1  # docs/recipes.md §2
    grad_checkpointing: bool = False
    init: str = ""  # start from these weights (flyeva folder or release checkpoint)
    # The release decays mask_token like every other weight matrix (docs/recipes.md §3).
    decay_mask_token: bool = True


@dataclass
class TeacherSection:
    path: str = ""  # local CLIP weights: open_clip file, HF folder, or a `flyeva convert teacher` folder
    model_name: str = "ViT-L-14-quickgelu"  # OpenAI weights need QuickGELU (docs/recipes.md §9)
    # A `flyeva clip train` recipe that writes `path` (its OUTPUT/final) first when it does not exist:
    # the miniature world trains its own CLIP teacher once and reuses it.
    train_recipe: str = ""
    # A randomly initialised stand-in tower (open_clip vision_cfg) when no weights are given.
    random_init: dict[str, Any] = field(default_factory=dict)
    random_seed: int = 0
    # auto | fp32 | bf16 | fp16. The release runs the teacher under autocast (docs/recipes.md §3);
    # auto = the training precision if reduced, else bf16 where the device has it natively, else fp32.
    precision: str = "auto"


@dataclass
class MaskSection:
    num_masking_patches: int = 105  # of 256 (~40%), docs/recipes.md §3
    # > 0: the fraction of the model's grid to mask (0.41 = 105 of 256), resolved against the grid;
    # it replaces num_masking_patches so one recipe fits any image or patch size.
    ratio: float = 0.0
    min_num_patches: int = 16
    min_aspect: float = 0.3
    # clip | pixels (normalised-pixel baseline) | distill (the teacher's features of the unmasked image
    # at every patch, no masking: the feature-distillation baseline of the paper's Table 2)
    target: str = "clip"


@dataclass
class DataSection:
    sources: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    samples_per_epoch: int = 0  # required for mixtures and webdataset shards
    scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # docs/recipes.md §3
    # Images with more pixels are decoded at 1/2-1/8 size (JPEG) or skipped and counted: a small
    # crafted file cannot take gigabytes per worker (docs/reliability.md).
    max_pixels: int = DEFAULT_MAX_PIXELS
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    max_val_batches: int = 50


@dataclass
class PretrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    mask: MaskSection = field(default_factory=MaskSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


MASK_TARGETS = ("clip", "pixels", "distill")


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Every value checked before any work (teacher training, data scans) starts."""
    cfg.train.check()
    check_schedule(cfg.optim)
    if cfg.mask.target not in MASK_TARGETS:
        raise ConfigError(f"mask.target must be one of {list(MASK_TARGETS)}, got {cfg.mask.target!r}")
    if not 0 <= cfg.mask.ratio < 1:
        raise ConfigError(
            f"mask.ratio must be in [0, 1) (0 = use mask.num_masking_patches), got {cfg.mask.ratio}"
        )
    if cfg.mask.num_masking_patches < 1 or cfg.mask.min_num_patches < 1:
        raise ConfigError("mask.num_masking_patches and mask.min_num_patches must be at least 1")
    if len(cfg.data.scale) != 2 or len(cfg.data.ratio) != 2:
        raise ConfigError("data.scale and data.ratio take two numbers each: [low, high]")
    low, high = cfg.data.scale
    if not 0 < low <= high <= 1:
        raise ConfigError(
            f"data.scale must be [low, high] with 0 < low <= high <= 1, got {list(cfg.data.scale)}"
        )
    if not 0 < cfg.data.ratio[0] <= cfg.data.ratio[1]:
        raise ConfigError(f"data.ratio must be [low, high] with 0 < low <= high, got {list(cfg.data.ratio)}")
    if not cfg.data.sources:
        raise ConfigError("no training data: set data.sources (a folder, list file or webdataset shards)")
    for section in (*cfg.data.sources, *cfg.data.val):
        try:
            check_source(section)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if section.type in ("folder", "list", "captions") and not Path(section.path).exists():
            raise ConfigError(f"data source {section.type} {section.path!r} does not exist; check the path")
    if cfg.model.init and not Path(cfg.model.init).exists():
        raise ConfigError(f"model.init {cfg.model.init} does not exist; check the path")
