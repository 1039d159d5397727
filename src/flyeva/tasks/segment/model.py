"""Segmenters, built from a recipe (fresh or from pretrained EVA weights) or a weights folder's `arch`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from flyeva.models.eva import EvaSize, get_size, init_finetune_weights, size_with
from flyeva.models.weights import is_weights_folder, load, read_config
from flyeva.tasks.segment.backbone import EvaBackbone, EvaSegmenter, load_pretrained_encoder
from flyeva.tasks.segment.mask2former_config import Mask2FormerSection
from flyeva.tasks.segment.upernet import EvaUperNet, UperNetSection

logger = logging.getLogger(__name__)
DECODERS = ("upernet", "mask2former")
# Default `out_indices` by encoder depth (BEiT/EVA-02 mmseg configs; EVA-g: the release's adapter
# interaction ends [9, 19, 29, 39]).
OUT_INDICES_BY_DEPTH = {4: [0, 1, 2, 3], 12: [3, 5, 7, 11], 24: [7, 11, 15, 23], 40: [9, 19, 29, 39]}


@dataclass
class ModelSection:
    init: str = ""  # pretrained encoder: flyeva folder (mim/encoder) or release checkpoint; "" = from scratch
    size: str = "eva_giant"  # only without init
    patch_size: int = 16  # the release resizes EVA's 14x14 kernel to 16x16 (bicubic); 0 = keep
    out_indices: list[int] = field(default_factory=list)  # [] = by depth (OUT_INDICES_BY_DEPTH)
    drop_path_rate: float = 0.5  # release `EVA-01/seg`
    grad_checkpointing: bool = False
    decoder: str = "mask2former"  # mask2former | upernet
    upernet: UperNetSection = field(default_factory=UperNetSection)
    mask2former: Mask2FormerSection = field(default_factory=Mask2FormerSection)


def check_model_section(cfg: ModelSection) -> None:
    """Reject bad values before any weights are read."""
    if cfg.decoder not in DECODERS:
        raise ValueError(f"model.decoder={cfg.decoder!r} is not one of {list(DECODERS)}")
    if not cfg.init:
        get_size(cfg.size)
    if cfg.patch_size < 0:
        raise ValueError(f"model.patch_size must be >= 0 (0 = the encoder's), got {cfg.patch_size}")


def default_out_indices(depth: int) -> list[int]:
    if depth in OUT_INDICES_BY_DEPTH:
        return list(OUT_INDICES_BY_DEPTH[depth])
    return [max(0, (level + 1) * depth // 4 - 1) for level in range(4)]  # evenly spaced, ending at the last


def _assemble(cfg: ModelSection, size: EvaSize, num_classes: int, out_indices: list[int]) -> EvaSegmenter:
    indices = list(out_indices) or default_out_indices(size.depth)
    backbone = EvaBackbone(size, indices, cfg.drop_path_rate, cfg.grad_checkpointing)
    if cfg.decoder == "upernet":
        return EvaUperNet(backbone, num_classes, cfg.upernet)
    from flyeva.tasks.segment.mask2former import EvaMask2Former  # transformers' Mask2Former: a slow import

    return EvaMask2Former(backbone, num_classes, cfg.mask2former)


def build_segmenter(cfg: ModelSection, num_classes: int, crop_size: int, seed: int = 0) -> EvaSegmenter:
    """A segmenter for `crop_size` inputs: EVA weights from `cfg.init` when given, else the release's init."""
    check_model_section(cfg)
    torch.manual_seed(seed)  # the same fresh decoder on every rank and every run
    if cfg.init and is_weights_folder(cfg.init) and read_config(cfg.init).get("kind") == "segmenter":
        return _from_segmenter(cfg, num_classes, crop_size)
    state = None
    if cfg.init:
        size, state = load_pretrained_encoder(cfg.init, cfg.patch_size, crop_size)
    else:
        base = get_size(cfg.size)
        size = size_with(base, img_size=crop_size, patch_size=cfg.patch_size or base.patch_size)
    model = _assemble(cfg, size, num_classes, cfg.out_indices)
    encoder = model.backbone.encoder
    if state is None:  # from scratch: the fine-tuning init, as build_encoder (docs/recipes.md §2)
        init_finetune_weights(encoder)
    else:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{cfg.init} does not hold a complete EVA encoder (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]}); point model.init at a pretraining or encoder weights folder"
            )
    loaded = len(state or {})
    total = len(model.state_dict())
    logger.info("model.init=%r: %d tensors loaded, %d start fresh", cfg.init, loaded, total - loaded)
    return model


def _from_segmenter(cfg: ModelSection, num_classes: int, crop_size: int) -> EvaSegmenter:
    """Start from a trained segmenter (the release's ADE20K stage starts from its COCO-Stuff model):
    every weight whose shape fits is kept; the class-dependent ones (class predictor, no-object
    weight, classifiers) start fresh when the class count differs."""
    arch = read_config(cfg.init)["arch"]
    if arch["decoder"] != cfg.decoder:
        raise ValueError(
            f"model.init={cfg.init} is a {arch['decoder']} segmenter but model.decoder={cfg.decoder}"
        )
    state = load(cfg.init).state_dict()
    size = size_with(EvaSize(**arch["encoder"]), img_size=crop_size)
    model = _assemble(cfg, size, num_classes, cfg.out_indices or arch["out_indices"])
    target = model.state_dict()
    if "backbone.encoder.pos_embed" in state:  # the table follows the new crop (bicubic, as timm resizes)
        grid = crop_size // size.patch_size
        state["backbone.encoder.pos_embed"] = resample_abs_pos_embed(
            state["backbone.encoder.pos_embed"], (grid, grid)
        )
    kept = {k: v for k, v in state.items() if k in target and target[k].shape == v.shape}
    fresh = sorted(set(target) - set(kept))
    model.load_state_dict(kept, strict=False)
    logger.info(
        "model.init=%s: %d tensors loaded, %d start fresh (%s)", cfg.init, len(kept), len(fresh), fresh[:4]
    )
    return model


def segmenter_arch(model: EvaSegmenter) -> dict[str, Any]:
    """The `arch` of a `segmenter` weights folder (see flyeva.models.weights)."""
    return model.arch()


def build_from_arch(arch: dict[str, Any]) -> nn.Module:
    """The un-initialised segmenter a weights folder describes (the `segmenter` builder)."""
    cfg = ModelSection(
        drop_path_rate=0.0,
        decoder=arch["decoder"],
        upernet=UperNetSection(**arch.get("upernet", {})),
        mask2former=Mask2FormerSection(**arch.get("mask2former", {})),
    )
    return _assemble(cfg, EvaSize(**arch["encoder"]), arch["num_classes"], arch["out_indices"])
