"""A detector from a config: from encoder weights, a saved detector, the release's file, or scratch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from flyeva.config import ConfigError
from flyeva.engine.optim import OptimConfig, layer_decay_groups
from flyeva.tasks.detect.config import DetectConfig, apply_test_settings, arch_from_config
from flyeva.tasks.detect.model import EvaDetector, backbone_from_encoder

logger = logging.getLogger(__name__)


def _encoder_dims(encoder: nn.Module) -> dict[str, int]:
    block = encoder.blocks[0]
    return {
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_dim": block.mlp.fc1.out_features,
    }


# The layers whose rows are classes: another label set (Objects365 -> COCO) gives them other shapes.
CLASS_LAYERS = (".cls_score.", ".mask_fcn_logits.")


def _fit(
    own: dict[str, tuple], found: dict[str, tuple], where: str, *, new_classes: bool, fresh_prefix: str = ""
) -> tuple[list[str], list[str]]:
    """(class layers of another label set, tensors a backbone-only file leaves fresh), from shapes
    alone; any other difference is one error. Only training (`new_classes`) may start classes fresh."""
    fresh = [k for k in own if k not in found and fresh_prefix and not k.startswith(fresh_prefix)]
    classes = [k for k in own if k in found and own[k] != found[k] and any(c in k for c in CLASS_LAYERS)]
    wrong = [k for k in own if k not in fresh and k not in classes and own[k] != found.get(k)]
    wrong += [k for k in found if k not in own]
    if wrong:
        key = wrong[0]
        raise ConfigError(
            f"{where} does not fit this detector: {len(wrong)} tensors differ, e.g. {key} is "
            f"{found.get(key, 'absent')} in the file and {own.get(key, 'absent')} here; set model.* "
            "(img_size, head sizes) to the file's"
        )
    if classes and not new_classes:
        scores = next(k for k in classes if "cls_score.weight" in k)
        raise ConfigError(
            f"{where} predicts {found[scores][0] - 1} classes, this detector {own[scores][0] - 1}; "
            "evaluate on the label set it was trained for"
        )
    if classes:
        logger.info(
            "%s: another label set: %d class-specific tensors start fresh (%s)",
            where,
            len(classes),
            classes[0],
        )
    if fresh:
        logger.info(
            "%s holds a backbone only: %d tensors of the pyramid and heads start fresh", where, len(fresh)
        )
    return classes, fresh


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _load_matching(
    detector: nn.Module, state: dict[str, torch.Tensor], where: str, *, new_classes: bool, fresh_prefix=""
) -> None:
    """Load every tensor of `state`, but the class layers of another label set (training only)."""
    classes, _ = _fit(
        _shapes(detector.state_dict()),
        _shapes(state),
        where,
        new_classes=new_classes,
        fresh_prefix=fresh_prefix,
    )
    detector.load_state_dict({k: v for k, v in state.items() if k not in classes}, strict=False)


def _from_detector_folder(
    cfg: DetectConfig, path: Path, num_classes: int | None, fed_weights, training: bool
) -> EvaDetector:
    from safetensors.torch import load_file

    from flyeva.models.weights import WEIGHTS_FILE, header_shapes, read_config

    config = read_config(path)
    arch = apply_test_settings(config["arch"], cfg.test, cfg.model.img_size)
    arch["roi_heads"]["num_classes"] = num_classes or arch["roi_heads"]["num_classes"]
    with torch.device("meta"):  # config.json is checked against the file's header before any allocation
        skeleton = _shapes(EvaDetector(arch).state_dict())
    classes, _ = _fit(skeleton, header_shapes(path / WEIGHTS_FILE), str(path), new_classes=training)
    detector = EvaDetector(arch, fed_weights)
    state = load_file(str(path / WEIGHTS_FILE))
    detector.load_state_dict({k: v for k, v in state.items() if k not in classes}, strict=False)
    return detector


def _from_release_file(
    cfg: DetectConfig, state: dict, num_classes: int | None, fed_weights, training: bool
) -> EvaDetector:
    """The release's detectron2 file (or its backbone alone): sizes, window and global blocks from the
    file, so a config that says otherwise cannot re-initialise the rel-pos tables."""
    from dataclasses import replace

    from flyeva.tasks.detect.release import detector_state_from_release, release_detector_arch

    sizes = release_detector_arch(state)
    backbone_only = sizes["num_classes"] is None
    if backbone_only and not training:
        raise ConfigError(
            "the release file holds a backbone only (no roi_heads.*); evaluate a whole detector"
        )
    dims = {k: sizes[k] for k in ("embed_dim", "depth", "mlp_dim", "num_heads")}
    geometry = {"window": sizes["window"], "global_blocks": sizes["global_blocks"]}
    if (cfg.model.window, list(cfg.model.global_blocks) or sizes["global_blocks"]) != tuple(
        geometry.values()
    ):
        logger.info("the release file's window %d and global blocks %s apply", *geometry.values())
    cfg = replace(cfg, model=replace(cfg.model, **geometry))
    classes = num_classes or sizes["num_classes"]
    arch = arch_from_config(cfg, dims | {"pos_grid": sizes["pos_grid"]}, classes)
    detector = EvaDetector(arch, fed_weights)
    renamed = detector_state_from_release(state, len(cfg.model.box_conv_dims))
    where = "the release detection checkpoint"
    _load_matching(
        detector, renamed, where, new_classes=training, fresh_prefix="backbone.net." if backbone_only else ""
    )
    return detector


def build_detector(
    cfg: DetectConfig,
    num_classes: int | None,
    fed_weights: torch.Tensor | None = None,
    *,
    training: bool = True,
) -> EvaDetector:
    """The detector of `cfg.model` for `num_classes` classes (None: the weights file's); training options
    (drop path ...) applied. Only training may start class layers of another label set fresh."""
    from flyeva.models.checkpoint import extract_state_dict, load_any, read_checkpoint
    from flyeva.models.eva import build_encoder, get_size
    from flyeva.models.weights import read_config
    from flyeva.tasks.detect.backbone import set_rel_pos_interp
    from flyeva.tasks.detect.model import set_training_options
    from flyeva.tasks.detect.release import is_release_detector

    m = cfg.model
    path = Path(m.init) if m.init else None
    if path is not None and not path.exists():
        raise FileNotFoundError(f"model.init={m.init} does not exist; give encoder or detector weights")
    if path is not None and path.is_dir() and read_config(path)["kind"] == "detector":
        detector = _from_detector_folder(cfg, path, num_classes, fed_weights, training)
    elif (
        path is not None
        and path.is_file()
        and is_release_detector(state := extract_state_dict(read_checkpoint(path)))
    ):
        detector = _from_release_file(cfg, state, num_classes, fed_weights, training)
    else:
        encoder = load_any(path, kind="encoder") if path is not None else build_encoder(get_size(m.size))
        net = backbone_from_encoder(
            encoder, patch_size=m.patch_size, img_size=m.img_size, window=m.window,
            pos_grid=m.pos_grid or None, global_blocks=list(m.global_blocks) or None,
        )  # fmt: skip
        dims = _encoder_dims(encoder) | {"pos_grid": net.pos_embed.shape[1] - 1}
        dims["pos_grid"] = round(dims["pos_grid"] ** 0.5)
        detector = EvaDetector(arch_from_config(cfg, dims, num_classes or 80), fed_weights)
        detector.backbone.net.load_state_dict(net.state_dict())
    set_training_options(detector, m.drop_path_rate, m.grad_checkpointing, m.freeze_patch_embed)
    set_rel_pos_interp(detector, m.rel_pos_interp)
    return detector


def release_param_groups(model: nn.Module, optim: OptimConfig, decay_all: bool = True) -> list[dict]:
    """Layer decay as the release's `get_vit_lr_decay_rate`; weight decay on every parameter when `decay_all`.

    The release applies wd 0.1 to norms, biases and pos_embed too (release `EVA-01/det`), unlike
    ViTDet's configs, which exempt norms and pos_embed; `model.weight_decay_all=false` exempts them.
    """
    groups = layer_decay_groups(model, optim)
    if decay_all:
        for group in groups:
            group["weight_decay"] = optim.weight_decay
    return groups
