"""The video model a recipe asks for: from scratch, inflated from an image EVA, or from a video model.

A video model's classifier comes along: unchanged when the label sets agree, its rows picked by class
name for a subset (K722 -> K400/600/700, release `EVA-01/video` `K722_CLASS_MAPPING`), new with
`model.reset_head=true`; its position table is resized trilinearly for other frame counts (8 -> 16).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from flyeva.data.video.datasets import read_class_names, read_index_rows
from flyeva.models.checkpoint import load_weights
from flyeva.models.eva import EvaSize, get_size, size_with
from flyeva.tasks.video.convert import load_init, map_classifier_rows
from flyeva.tasks.video.model import (
    FINAL_NORMS,
    HEAD_INIT_SCALE,
    VideoEva,
    add_temporal_pos,
    add_tubelet_motion,
    build_video_model,
    inflate_image_state,
    init_head,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelSection:
    """The video model; defaults are the release's K400 stage of EVA-g (paper section 4.2)."""

    init: str = ""  # "" = from scratch; an image encoder is inflated, a video model continues
    init_classes: str = ""  # class names of a release video checkpoint's head (flyeva folders carry theirs)
    reset_head: bool = False  # a new head even when the init has one
    # The init's head row of each data class: a .npy index array (the release's k722_to_k400_mapping.npy)
    # or one index per line; "" = by class name when the label sets differ.
    class_mapping: str = ""
    size: str = "eva_giant"  # only without init
    num_heads: int = 0  # a release video checkpoint of a size `flyeva models` does not name (0 = by size)
    img_size: int = 224
    num_frames: int = 16
    tubelet_size: int = 1  # the release's EVA video models use 1
    final_norm: str = "fc_norm"  # image inits: fc_norm (the encoder's final norm) | drop (fresh fc_norm)
    temporal_pos_std: float = 0.0  # image inits: std of a per-time-slot position term (docs/video.md)
    tubelet_motion: float = 0.0  # image inits: scale of a zero-sum tubelet kernel term (docs/video.md)
    drop_path_rate: float = 0.2
    head_init_scale: float = HEAD_INIT_SCALE
    grad_checkpointing: bool = True  # the release trains EVA-g video models with it


def check_model_section(cfg: ModelSection) -> None:
    """Reject bad values before any work."""
    if cfg.final_norm not in FINAL_NORMS:
        raise ValueError(f"model.final_norm must be one of {', '.join(FINAL_NORMS)}, got {cfg.final_norm!r}")
    if cfg.num_frames < 1 or cfg.tubelet_size < 1 or cfg.num_frames % cfg.tubelet_size:
        raise ValueError(
            f"model.num_frames={cfg.num_frames} must be a positive multiple of "
            f"model.tubelet_size={cfg.tubelet_size}"
        )
    if not 0 < cfg.img_size <= 1024:  # release 224; 16 frames at 1024 px are already 85k tokens
        raise ValueError(f"model.img_size={cfg.img_size} must be in [1, 1024] px (release: 224)")
    for name in ("temporal_pos_std", "tubelet_motion"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(
                f"model.{name} must be >= 0 (0 = the release's inflation), got {getattr(cfg, name)}"
            )
    if not cfg.init:
        get_size(cfg.size)


def _head_for(
    init_state: dict, init_classes: list[str] | None, classes: list[str], cfg: ModelSection
) -> dict | None:
    head = {k: init_state.pop(k) for k in ("head.weight", "head.bias") if k in init_state}
    if not head:
        return None
    if cfg.class_mapping:  # a .npy index array (never unpickled) or one index per line
        rows = read_index_rows(cfg.class_mapping, "model.class_mapping")
        if len(rows) != len(classes):
            mapping = f"model.class_mapping {cfg.class_mapping}"
            raise ValueError(f"{mapping} has {len(rows)} rows for {len(classes)} data classes")
        rows = torch.tensor(rows)
        if int(rows.max()) >= head["head.weight"].shape[0] or int(rows.min()) < 0:
            raise ValueError(f"model.class_mapping {cfg.class_mapping} indexes rows outside the init's head")
        return {k: v[rows] for k, v in head.items()}
    if init_classes is not None and list(init_classes) != list(classes):
        logger.info("picking %d classifier rows of %s by class name", len(classes), cfg.init)
        return map_classifier_rows(head, init_classes, classes)
    if head["head.weight"].shape[0] != len(classes):
        raise ValueError(
            f"{cfg.init} has a {head['head.weight'].shape[0]}-class head, the data {len(classes)} classes; "
            "name its classes (model.init_classes) or give model.class_mapping to pick rows, "
            "or set model.reset_head=true"
        )
    return head


def build_model(cfg: ModelSection, classes: list[str], seed: int = 0) -> VideoEva:
    """The model of `cfg` for `classes`, loaded from `cfg.init` when given."""
    check_model_section(cfg)
    torch.manual_seed(seed)  # the same fresh head (and drop path) on every rank and every run
    shared = ("tubelet_size", "drop_path_rate", "head_init_scale", "grad_checkpointing")
    options = {k: getattr(cfg, k) for k in shared}
    if not cfg.init:
        size = size_with(get_size(cfg.size), img_size=cfg.img_size)
        model = build_video_model(size, len(classes), num_frames=cfg.num_frames, **options)
        logger.info("model.init='': 0 tensors loaded, %d start fresh", len(model.state_dict()))
        return model
    state, arch, kind = load_init(cfg.init, cfg.img_size, cfg.num_heads or None)
    size = EvaSize(**arch["size"])
    if kind == "image":
        state = inflate_image_state(state, cfg.num_frames, cfg.tubelet_size, cfg.final_norm)
        frames = cfg.num_frames
    else:
        if arch["tubelet_size"] != cfg.tubelet_size:
            raise ValueError(
                f"{cfg.init} has tubelet size {arch['tubelet_size']}; set model.tubelet_size to it"
            )
        frames = arch["num_frames"]
    model = build_video_model(size, len(classes), num_frames=frames, **options)
    init_classes = read_class_names(cfg.init_classes) if cfg.init_classes else arch.get("classes")
    head = None if cfg.reset_head else _head_for(state, init_classes, classes, cfg)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    fresh = ("head.",) if head is None else ()
    fresh += ("fc_norm.",) if kind == "image" and cfg.final_norm == "drop" else ()
    loaded = {**state, **(head or {})}
    load_weights(model, loaded, ignore_missing=fresh)
    if head is None:
        init_head(model.head, cfg.head_init_scale)
    if kind == "image" and cfg.temporal_pos_std > 0:
        add_temporal_pos(model, cfg.temporal_pos_std)
    if kind == "image" and cfg.tubelet_motion > 0:
        add_tubelet_motion(model, cfg.tubelet_motion)
    new = [k for k in model.state_dict() if k not in loaded]
    logger.info("model.init=%s: %d tensors loaded, %d start fresh %s", cfg.init, len(loaded), len(new), new)
    if (frames, size.img_size) != (cfg.num_frames, cfg.img_size):
        message = "resizing the position table from %d x %d to %d x %d"
        logger.info(message, frames, size.img_size, cfg.num_frames, cfg.img_size)
        model.resize(cfg.num_frames, cfg.img_size)
    return model
