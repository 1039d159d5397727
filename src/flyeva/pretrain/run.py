"""`flyeva pretrain`: the MIM stage on the shared engine (student, teacher, masks, image stream)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.data.masking import BlockMaskGenerator
from flyeva.data.sources import build_sources
from flyeva.data.stream import ImageBatchStream
from flyeva.data.transforms import EvalTransform, PretrainTransform
from flyeva.engine import distributed as D
from flyeva.engine.stage import Built
from flyeva.models.checkpoint import load_weights, read_encoder_state, save_flyeva
from flyeva.models.convert import MIM_ONLY_KEYS
from flyeva.models.eva import EvaForMIM, build_mim_model, get_size, size_with
from flyeva.pretrain.config import MaskSection, PretrainConfig, TeacherSection
from flyeva.pretrain.objective import MIMObjective
from flyeva.teachers import (
    TEACHER_PRECISIONS,
    build_clip_teacher,
    check_token_grid,
    load_clip_teacher,
    precision_name,
    resolve_teacher_dtype,
)

logger = logging.getLogger(__name__)


def masked_patches(mask: MaskSection, grid_size: int) -> int:
    """How many patches a mask covers: `mask.ratio` of the grid when set, else the absolute count."""
    return max(1, round(mask.ratio * grid_size**2)) if mask.ratio > 0 else mask.num_masking_patches


def build_masking(mask: MaskSection, grid_size: int) -> BlockMaskGenerator | None:
    """The block-wise mask generator; None for `mask.target=distill`, which masks nothing."""
    if mask.target == "distill":
        logger.info("mask.target=distill: no masking, the loss is over every patch (paper Table 2)")
        return None
    return BlockMaskGenerator(
        grid=(grid_size, grid_size),
        num_masking_patches=masked_patches(mask, grid_size),
        min_num_patches=mask.min_num_patches,
        min_aspect=mask.min_aspect,
    )


def build_teacher(cfg: TeacherSection) -> torch.nn.Module | None:
    if cfg.path:
        return load_clip_teacher(cfg.path, cfg.model_name or None)
    if cfg.random_init:
        return build_clip_teacher(dict(cfg.random_init), seed=cfg.random_seed)
    raise ValueError(
        "no teacher: set teacher.path to local CLIP weights (e.g. teacher.path=weights/ViT-L-14, written by "
        "`flyeva convert teacher`), or mask.target=pixels for the pixel baseline"
    )


def load_init(model: EvaForMIM, path: str) -> None:
    """Encoder weights from `path`; its mask_token and lm_head too when it has them and they fit.

    Continuing a release MIM checkpoint needs all three; a fine-tuned or CLIP checkpoint has no MIM
    head, and a head for another teacher has the wrong width: those parts start fresh (logged).
    """
    state = read_encoder_state(path)
    for key, value in state.items():
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            problem = f"{value.dtype} values" if not value.is_floating_point() else "non-finite values"
            raise ConfigError(f"model.init {path}: {key} holds {problem}; these are not trained weights")
    expected = model.state_dict()
    fitting = [k for k in MIM_ONLY_KEYS if k in state and state[k].shape == expected[k].shape]
    fresh = [k for k in MIM_ONLY_KEYS if k not in fitting]
    for key in fresh:
        if key in state:
            logger.warning(
                "%s in %s has shape %s, this run needs %s: it starts fresh",
                key,
                path,
                tuple(state[key].shape),
                tuple(expected[key].shape),
            )
    kept = {k: v for k, v in state.items() if k not in MIM_ONLY_KEYS or k in fitting}
    load_weights(model, kept, ignore_missing=tuple(fresh))
    logger.info(
        "model.init %s: loaded the encoder%s; started fresh: %s",
        path,
        f" and {', '.join(fitting)}" if fitting else "",
        ", ".join(fresh) or "nothing",
    )


def build_pretrain(cfg: PretrainConfig) -> Built:
    """The MIM student, its teacher-feature objective and the image stream (`run_stage` trains them)."""
    device = D.init_distributed(cfg.train.device)  # the stream below shards by rank: join the group first
    size = get_size(cfg.model.size)
    if cfg.model.img_size:
        size = size_with(size, img_size=cfg.model.img_size)
    teacher = build_teacher(cfg.teacher) if cfg.mask.target != "pixels" else None
    if teacher is not None:
        check_token_grid(teacher, (size.grid_size, size.grid_size), size.img_size)
        teacher_dim = teacher.embed_dim
        dtype = resolve_teacher_dtype(cfg.teacher.precision, cfg.train.precision, device)
        cfg.teacher = replace(cfg.teacher, precision=precision_name(dtype))  # config.yaml records what ran
        teacher.to(TEACHER_PRECISIONS[cfg.teacher.precision])
        logger.info("teacher %s runs in %s", teacher.name, cfg.teacher.precision)
    else:
        teacher_dim = 3 * size.patch_size**2
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run

    def make_model(**kwargs: Any) -> torch.nn.Module:
        return build_mim_model(size, teacher_dim=teacher_dim, **kwargs)

    model = make_model(
        drop_path_rate=cfg.model.drop_path_rate, grad_checkpointing=cfg.model.grad_checkpointing
    )
    model.decay_mask_token = cfg.model.decay_mask_token
    if cfg.model.init:
        load_init(model, cfg.model.init)

    objective = MIMObjective(teacher, build_masking(cfg.mask, size.grid_size), size.patch_size)
    transform = PretrainTransform(
        image_size=size.img_size,
        scale=tuple(cfg.data.scale),
        ratio=tuple(cfg.data.ratio),
        hflip=cfg.data.hflip,
    )
    stream = ImageBatchStream(
        build_sources(cfg.data.sources, cfg.data.samples_per_epoch),
        transform,
        batch_size=cfg.train.batch_size,
        rank=D.rank(),
        world_size=D.world_size(),
        seed=cfg.train.seed,
        max_pixels=cfg.data.max_pixels,
    )
    evaluate = _validation(cfg, objective, size.img_size) if cfg.data.val else None

    def save_final(state: dict[str, torch.Tensor], folder: Path) -> None:
        final = make_model(release_init=False)  # a plain copy: the trained one may be FSDP-sharded
        final.load_state_dict(state)
        save_flyeva(final, folder, extra={"recipe": cfg.model.size})

    return Built(model, objective, stream, save_final, evaluator=evaluate)


def _validation(cfg: PretrainConfig, objective: MIMObjective, image_size: int):
    stream = ImageBatchStream(
        build_sources(cfg.data.val, cfg.data.samples_per_epoch),
        EvalTransform(image_size),
        batch_size=cfg.train.batch_size,
        rank=0,
        world_size=1,
        seed=0,
    )

    def evaluate(model: torch.nn.Module, ctx: Any) -> dict[str, float]:
        stream.set_epoch(0)
        losses = []
        for index, batch in enumerate(stream):
            if index >= cfg.data.max_val_batches:
                break
            if len(batch["images"]):
                losses.append(objective.validation_loss(model, batch["images"].to(ctx.device)).item())
        return {"val_loss": sum(losses) / max(1, len(losses))}

    return evaluate
