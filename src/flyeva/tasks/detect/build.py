"""A detector from a config: from encoder weights, a saved detector, the release's file, or scratch."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from flyeva.config import ConfigError
from flyeva.engine.optim import OptimConfig, layer_decay_groups
from flyeva.tasks.detect.model import EvaDetector, backbone_from_encoder
from flyeva.tasks.detect.recipe import DetectConfig, apply_test_settings, arch_from_config

logger = logging.getLogger(__name__)


def _encoder_dims(encoder: nn.Module) -> dict[str, int]:
    block = encoder.blocks[0]
    return {
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_dim": block.mlp.fc1.out_features,
    }


def _load_matching(detector: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load what fits; class-specific layers of another label set start fresh (e.g. Objects365 -> COCO)."""
    own = detector.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise ConfigError(
            f"{where} holds weights this detector lacks (e.g. {unexpected[0]}); check model.* sizes"
        )
    fresh = [k for k in own if k not in fitting]
    if fresh:
        logger.warning("%s: %d tensors start fresh (other shapes), e.g. %s", where, len(fresh), fresh[:3])
    detector.load_state_dict(fitting, strict=False)


def _from_detector_folder(cfg: DetectConfig, path: Path, num_classes: int, fed_weights) -> EvaDetector:
    from safetensors.torch import load_file

    from flyeva.models.weights import WEIGHTS_FILE, read_config

    config = read_config(path)
    arch = apply_test_settings(config["arch"], cfg.test, cfg.model.img_size)
    arch["roi_heads"]["num_classes"] = num_classes
    detector = EvaDetector(arch, fed_weights)
    _load_matching(detector, load_file(str(path / WEIGHTS_FILE)), str(path))
    return detector


def _from_release_file(cfg: DetectConfig, state: dict, num_classes: int, fed_weights) -> EvaDetector:
    from flyeva.models.convert import detector_state_from_release, release_detector_arch

    sizes = release_detector_arch(state)
    dims = {k: sizes[k] for k in ("embed_dim", "depth", "mlp_dim")}
    dims["num_heads"] = 16 if sizes["embed_dim"] in (1024, 1408) else max(1, sizes["embed_dim"] // 64)
    arch = arch_from_config(cfg, dims | {"pos_grid": sizes["pos_grid"]}, num_classes)
    detector = EvaDetector(arch, fed_weights)
    renamed = detector_state_from_release(state, len(cfg.model.box_conv_dims))
    _load_matching(detector, renamed, "release detection checkpoint")
    return detector


def build_detector(
    cfg: DetectConfig, num_classes: int, fed_weights: torch.Tensor | None = None
) -> EvaDetector:
    """The detector of `cfg.model` for `num_classes` classes; training options (drop path ...) applied."""
    from flyeva.models.checkpoint import extract_state_dict, load_any, read_checkpoint
    from flyeva.models.convert import is_release_detector
    from flyeva.models.eva import build_encoder, get_size
    from flyeva.models.weights import read_config
    from flyeva.tasks.detect.backbone import set_rel_pos_interp
    from flyeva.tasks.detect.model import set_training_options

    m = cfg.model
    path = Path(m.init) if m.init else None
    if path is not None and not path.exists():
        raise FileNotFoundError(f"model.init={m.init} does not exist; give encoder or detector weights")
    if path is not None and path.is_dir() and read_config(path)["kind"] == "detector":
        detector = _from_detector_folder(cfg, path, num_classes, fed_weights)
    elif (
        path is not None
        and path.is_file()
        and is_release_detector(state := extract_state_dict(read_checkpoint(path)))
    ):
        detector = _from_release_file(cfg, state, num_classes, fed_weights)
    else:
        encoder = load_any(path, kind="encoder") if path is not None else build_encoder(get_size(m.size))
        net = backbone_from_encoder(
            encoder, patch_size=m.patch_size, img_size=m.img_size, window=m.window,
            pos_grid=m.pos_grid or None, global_blocks=list(m.global_blocks) or None,
        )  # fmt: skip
        dims = _encoder_dims(encoder) | {"pos_grid": net.pos_embed.shape[1] - 1}
        dims["pos_grid"] = round(dims["pos_grid"] ** 0.5)
        detector = EvaDetector(arch_from_config(cfg, dims, num_classes), fed_weights)
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
