"""`flyeva segment` configs: the recipe schema, and the checks run before any work.

Schema defaults are the release's EVA-g + Mask2Former ADE20K stage (paper section 4.2, release
`EVA-01/seg`): crop 896, AdamW (0.9, 0.999) lr 2.5e-5, wd 0.05, layer decay 0.95, poly (power 1)
to 0 after a 500-iteration warmup, 20k iterations at batch 64, drop path 0.5, slide inference
896 / 512. Recipes in configs/segment/ change only what differs (docs/segment.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flyeva.config import ConfigError
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig, check_schedule
from flyeva.tasks.segment.backbone import check_init_kind
from flyeva.tasks.segment.data import DataSection, check_data_section
from flyeva.tasks.segment.evaluate import EvalSection, check_eval_section
from flyeva.tasks.segment.model import ModelSection, check_model_section
from flyeva.tasks.segment.transforms import AugSection, TrainTransform


def _segment_optim() -> OptimConfig:
    # mmseg's AdamW and poly schedule: warmup from lr x 1e-6 (warmup_ratio), to min_lr 0, no clipping.
    return OptimConfig(
        lr=2.5e-5,
        min_lr=0.0,
        weight_decay=0.05,
        betas=[0.9, 0.999],
        eps=1e-8,
        layer_decay=0.95,
        warmup_steps=500,
        warmup="factor",
        warmup_factor=1e-6,
        schedule="poly",
        poly_power=1.0,
        clip_grad=0.0,
    )


def _segment_train() -> TrainConfig:
    # 20k iterations as 10 engine epochs of 2000 (evaluation after each); 64 = 8 GPUs x 8 images.
    return TrainConfig(
        output_dir="runs/segment",
        epochs=10,
        steps_per_epoch=2000,
        batch_size=8,
        precision="fp16",
        strategy="ddp",
        num_workers=4,
        checkpoint_every=2000,
    )


@dataclass
class SegmentConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugSection = field(default_factory=AugSection)
    eval: EvalSection = field(default_factory=EvalSection)
    optim: OptimConfig = field(default_factory=_segment_optim)
    train: TrainConfig = field(default_factory=_segment_train)
    weights: str = ""  # eval / predict: a segmenter weights folder (OUTPUT/final of `segment train`)


# The largest crop (aug.crop_size, eval.crop_size) accepted, in pixels: the release's crops are 512-896;
# a crop of 10^5 would size position tables and padded batches that exhaust memory before any check.
MAX_CROP = 4096


def resolve(cfg: SegmentConfig) -> SegmentConfig:
    """Check every value before any work, and fill the eval defaults that follow the augmentation."""
    try:
        check_model_section(cfg.model)
        check_init_kind(cfg.model.init)  # a video or detector folder: one line before any data is written
        check_data_section(cfg.data)
        for key, crop in (("aug.crop_size", cfg.aug.crop_size), ("eval.crop_size", cfg.eval.crop_size)):
            if crop > MAX_CROP:
                raise ValueError(f"{key}={crop} is over the limit of {MAX_CROP} px (release: 512-896)")
        cfg.eval.crop_size = cfg.eval.crop_size or cfg.aug.crop_size
        cfg.eval.scale = list(cfg.eval.scale or cfg.aug.scale)
        check_eval_section(cfg.eval)
        check_schedule(cfg.optim)
        TrainTransform(cfg.aug)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return cfg
