"""`flyeva classify finetune`: fine-tune a pretrained encoder with layer-wise lr decay (docs/recipes.md §4).

Schema defaults are the release's IN-1K fine-tuning of EVA-g (336 px): batch 512 (16 x 32 GPUs),
lr 3e-5, layer decay 0.95, 10 epochs with 2 warmup, drop path 0.4, smoothing 0.3, RandAugment m9,
crop scale (0.08, 1), EMA 0.9999, evaluated with and without EMA. Recipes in configs/classify/.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models.eva import Eva

from flyeva.data.stream import ImageBatchStream
from flyeva.engine import distributed as D
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.engine.stage import Built
from flyeva.eval.classification import ClassificationObjective, Evaluator
from flyeva.models.eva import get_size, size_with
from flyeva.tasks.classify.data import AugSection, DataSection, TrainTransform, eval_stream, prepare_data
from flyeva.tasks.classify.model import (
    HEAD_INIT_SCALE,
    build_classifier,
    classifier_from_pretrained,
    freeze_patch_embed,
    load_pretrained,
    save_classifier,
    timm_kwargs,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    init: str = ""  # pretrained weights: flyeva folder (MIM/encoder/classifier) or release checkpoint
    size: str = "eva_giant"  # only used without init (training from scratch)
    num_heads: int = 0  # only for a release checkpoint of a size `flyeva models` does not name
    img_size: int = 336  # 0 = the checkpoint's; else position embeddings are interpolated (336/560)
    pool: str = "avg"  # avg (mean patch tokens -> fc_norm) | cls, docs/recipes.md §4
    final_norm: str = "fc_norm"  # fc_norm | drop (the release) | keep; see docs/classify.md
    freeze_patch_embed: bool = False  # the release freezes it silently (docs/recipes.md §9)
    reset_head: bool = False  # true: a new head even when the checkpoint has one (IN-21K -> IN-1K)
    drop_path_rate: float = 0.4  # docs/recipes.md §4
    head_init_scale: float = HEAD_INIT_SCALE
    grad_checkpointing: bool = False


def _finetune_optim() -> OptimConfig:
    # docs/recipes.md §4, IN-1K: lr 3e-5 at batch 512, layer decay 0.95, 2 warmup epochs, min lr 0;
    # the release's AdamW defaults (betas 0.9/0.999, eps 1e-8), weight decay 0.05, no clipping.
    return OptimConfig(
        lr=3e-5,
        min_lr=0.0,
        weight_decay=0.05,
        betas=[0.9, 0.999],
        eps=1e-8,
        layer_decay=0.95,
        warmup_epochs=2,
        clip_grad=0.0,
    )


def _finetune_train() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/classify", epochs=10, batch_size=16, ema_decay=0.9999, checkpoint_every=1000
    )


@dataclass
class FinetuneConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugSection = field(default_factory=lambda: AugSection(smoothing=0.3))
    optim: OptimConfig = field(default_factory=_finetune_optim)
    train: TrainConfig = field(default_factory=_finetune_train)


def build_model(cfg: ModelSection, num_classes: int, seed: int = 0) -> Eva:
    """The classifier of `cfg`: from pretrained weights, or freshly initialised from a named size."""
    torch.manual_seed(seed)  # the same fresh head (and drop path) on every rank and every run
    kwargs = dict(
        pool=cfg.pool,
        final_norm=cfg.final_norm,
        drop_path_rate=cfg.drop_path_rate,
        head_init_scale=cfg.head_init_scale,
        grad_checkpointing=cfg.grad_checkpointing,
    )
    if cfg.init:
        weights = load_pretrained(cfg.init, cfg.num_heads)
        model = classifier_from_pretrained(
            weights, num_classes, reset_head=cfg.reset_head, img_size=cfg.img_size, **kwargs
        )
    else:
        size = get_size(cfg.size)
        model = build_classifier(
            size_with(size, img_size=cfg.img_size or size.img_size), num_classes, **kwargs
        )
    if cfg.freeze_patch_embed:
        freeze_patch_embed(model)
    return model


def from_scratch_warning(cfg: FinetuneConfig) -> str:
    """The line a run without `model.init` logs, naming the settings on that are made for pretrained encoders
    (head scale, layer decay, EMA: each costs top-1 from random weights, docs/classify.md)."""
    made_for_pretrained = {
        "model.head_init_scale": (cfg.model.head_init_scale, cfg.model.head_init_scale < 1),
        "optim.layer_decay": (cfg.optim.layer_decay, cfg.optim.layer_decay < 1),
        "train.ema_decay": (cfg.train.ema_decay, cfg.train.ema_decay > 0),
    }
    on = [f"{key}={value}" for key, (value, is_on) in made_for_pretrained.items() if is_on]
    line = "model.init is empty: the classifier starts from random weights (a from-scratch baseline)"
    if on:
        line += (
            f"; settings made for pretrained encoders slow a from-scratch start: {', '.join(on)}; "
            "--config miniature has the from-scratch ones (head_init_scale=1, layer_decay=1, "
            "ema_decay=0; docs/classify.md)"
        )
    return line


def build_finetune(cfg: FinetuneConfig) -> Built:
    """The classifier, its loss (Mixup, smoothing) and the data on the shared engine."""
    D.init_distributed(cfg.train.device)
    if not cfg.model.init:
        logger.warning(from_scratch_warning(cfg))
    data = prepare_data(cfg.data)
    model = build_model(cfg.model, data.num_classes, cfg.train.seed)
    image_size = model.patch_embed.img_size[0]
    rank, world = D.rank(), D.world_size()
    transform = TrainTransform(image_size, cfg.aug)
    # drop_last: whole batches, as the release's loader (and Mixup pairs) want
    stream = ImageBatchStream(
        data.train, transform, cfg.train.batch_size, rank, world, cfg.train.seed, drop_last=True
    )
    mixup = dict(
        mixup_alpha=cfg.aug.mixup,
        cutmix_alpha=cfg.aug.cutmix,
        prob=cfg.aug.mixup_prob,
        switch_prob=cfg.aug.mixup_switch_prob,
        mode=cfg.aug.mixup_mode,
    )
    evaluator = None
    if data.val is not None:
        val = eval_stream(data.val, image_size, cfg.data.crop_pct, cfg.train.batch_size, rank, world)
        evaluator = Evaluator(
            val, data.num_classes, cfg.train.precision, cfg.data.max_val_batches, classes=data.classes
        )
    kwargs = timm_kwargs(model)
    extra = {"classes": data.classes, "pool": cfg.model.pool, "final_norm": cfg.model.final_norm}

    def save_final(state: dict[str, torch.Tensor], folder: Path) -> None:
        final = Eva(**kwargs, qkv_bias=True)  # a plain copy of a maybe-sharded model
        final.load_state_dict(state)
        save_classifier(final, folder, extra)

    return Built(
        model,
        ClassificationObjective(data.num_classes, cfg.aug.smoothing, mixup),
        stream,
        save_final,
        evaluator=evaluator,
        facts={"num_classes": data.num_classes},
    )
