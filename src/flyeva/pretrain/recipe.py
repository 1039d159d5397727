"""`flyeva pretrain`: the config schema (defaults = EVA-g's recipe, docs/recipes.md §3) and the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.data.masking import BlockMaskGenerator
from flyeva.data.sources import DEFAULT_MAX_PIXELS, SourceConfig, build_sources, check_source
from flyeva.data.stream import ImageBatchStream
from flyeva.data.transforms import EvalTransform, PretrainTransform
from flyeva.engine import distributed as D
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig, check_schedule
from flyeva.engine.stage import Built
from flyeva.models.checkpoint import load_weights, read_encoder_state, save_flyeva
from flyeva.models.convert import MIM_ONLY_KEYS
from flyeva.models.eva import EvaForMIM, build_mim_model, get_size, size_with
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
    target: str = "clip"  # clip | pixels (normalised-pixel baseline)


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


def with_resolved_teacher_precision(
    cfg: PretrainConfig, device: torch.device | None = None
) -> PretrainConfig:
    """`cfg` with `teacher.precision: auto` replaced by what runs on `device` (default: train.device)."""
    if device is None:
        use_cuda = cfg.train.device.startswith("cuda") or (
            cfg.train.device == "auto" and torch.cuda.is_available()
        )
        device = torch.device("cuda" if use_cuda else "cpu")
    dtype = resolve_teacher_dtype(cfg.teacher.precision, cfg.train.precision, device)
    return replace(cfg, teacher=replace(cfg.teacher, precision=precision_name(dtype)))


MASK_TARGETS = ("clip", "pixels")


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


def masked_patches(mask: MaskSection, grid_size: int) -> int:
    """How many patches a mask covers: `mask.ratio` of the grid when set, else the absolute count."""
    return max(1, round(mask.ratio * grid_size**2)) if mask.ratio > 0 else mask.num_masking_patches


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
    teacher = build_teacher(cfg.teacher) if cfg.mask.target == "clip" else None
    if teacher is not None:
        check_token_grid(teacher, (size.grid_size, size.grid_size), size.img_size)
        teacher_dim = teacher.embed_dim
        cfg.teacher = with_resolved_teacher_precision(cfg, device).teacher  # config.yaml records what ran
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

    masking = BlockMaskGenerator(
        grid=(size.grid_size, size.grid_size),
        num_masking_patches=masked_patches(cfg.mask, size.grid_size),
        min_num_patches=cfg.mask.min_num_patches,
        min_aspect=cfg.mask.min_aspect,
    )
    objective = MIMObjective(teacher, masking, size.patch_size)
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
