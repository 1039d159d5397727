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


# The layers whose rows are classes: another label set (Objects365 -> COCO) gives them other shapes.
CLASS_LAYERS = (".cls_score.", ".mask_fcn_logits.")
# The mask branch: a box-only detector (`model.mask_head=false`, Objects365) has none.
MASK_BRANCH = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")


def _fit(
    own: dict[str, tuple], found: dict[str, tuple], where: str, *, new_classes: bool, fresh_prefix: str = ""
) -> list[str]:
    """The tensors of the file not to load, from shapes alone.

    Training (`new_classes`) may start fresh the class layers of another label set and a mask branch
    the file lacks (a box-only Objects365 detector -> a COCO mask detector), and leaves out the file's
    mask branch when this detector has none; all of it is named in one log line with counts. A
    backbone-only file leaves everything outside `fresh_prefix` fresh. Any other difference, and any
    difference at all in eval or predict, is one error."""
    own_masks = [k for k in own if k.startswith(MASK_BRANCH)]
    found_masks = [k for k in found if k.startswith(MASK_BRANCH)]
    fresh = [k for k in own if k not in found and fresh_prefix and not k.startswith(fresh_prefix)]
    new_mask = own_masks if new_classes and not found_masks and not fresh else []
    unused = found_masks if new_classes and not own_masks else []
    classes = [k for k in own if k in found and own[k] != found[k] and any(c in k for c in CLASS_LAYERS)]
    skip = set(fresh) | set(new_mask) | set(classes)
    wrong = [k for k in own if k not in skip and own[k] != found.get(k)]
    wrong += [k for k in found if k not in own and k not in unused]
    if wrong:
        key = wrong[0]
        if key.startswith(MASK_BRANCH) and not (own_masks and found_masks):
            has = "has a mask branch" if found_masks else "has no mask branch"
            raise ConfigError(
                f"{where} {has} and this detector {'does not' if found_masks else 'does'}; "
                f"set model.mask_head={'true' if found_masks else 'false'} to use it as it is"
            )
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
    parts = []
    if classes:
        scores = next((k for k in classes if "cls_score.weight" in k), classes[0])
        change = f"{found[scores][0] - 1} -> {own[scores][0] - 1} classes" if "cls_score" in scores else ""
        parts.append(f"{len(classes)} class-specific tensors start fresh (another label set: {change})")
    if new_mask:
        parts.append(f"{len(new_mask)} mask-branch tensors start fresh (the file has no mask head)")
    if unused:
        parts.append(f"{len(unused)} mask-branch tensors of the file are left out (model.mask_head=false)")
    if parts:
        logger.info("%s: %s", where, "; ".join(parts))
    if fresh:
        logger.info(
            "%s holds a backbone only: %d tensors of the pyramid and heads start fresh", where, len(fresh)
        )
    return classes + unused


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ConfigError(
                f"{where}: {key} holds NaN or Inf values; these are not trained weights (a diverged run's "
                "folder?): use the weights of a run that finished"
            )


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a truncated or corrupt file, or a NaN, is one error naming it."""
    from safetensors import SafetensorError, safe_open

    from flyeva.models.weights import WeightsError

    try:
        with safe_open(str(file), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError) as error:
        raise WeightsError(f"{file} is truncated or corrupt ({error}); re-copy or re-download it") from None
    _check_finite(state, str(file))
    return state


def _from_detector_folder(
    cfg: DetectConfig, path: Path, num_classes: int | None, fed_weights, training: bool
) -> EvaDetector:
    from flyeva.models.weights import WEIGHTS_FILE, header_shapes, read_config

    config = read_config(path)
    if not isinstance(config.get("arch"), dict) or not isinstance(config["arch"].get("roi_heads"), dict):
        raise ConfigError(f"{path}/config.json holds no detector architecture ('arch'); re-export the folder")
    arch = apply_test_settings(config["arch"], cfg.test, cfg.model.img_size)
    heads, m = arch["roi_heads"], cfg.model
    heads["num_classes"] = num_classes or heads["num_classes"]
    # a training start has a mask branch exactly when its data is read with masks (`run.build_train`)
    if training and not (m.mask_head and m.mask_dims):
        heads["mask_dims"] = []
    elif training:  # the file's branch, or a fresh one where it has none (Objects365 -> COCO)
        heads["mask_dims"] = list(heads["mask_dims"]) or list(m.mask_dims)
    with torch.device("meta"):  # config.json is checked against the file's header before any allocation
        skeleton = _shapes(EvaDetector(arch).state_dict())
    skipped = _fit(skeleton, header_shapes(path / WEIGHTS_FILE), str(path), new_classes=training)
    detector = EvaDetector(arch, fed_weights)
    state = read_tensors(path / WEIGHTS_FILE)
    detector.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
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
    dims = {k: sizes[k] for k in ("embed_dim", "depth", "mlp_dim", "num_heads", "pos_grid")}
    geometry = {"window": sizes["window"], "global_blocks": sizes["global_blocks"]}
    if (cfg.model.window, list(cfg.model.global_blocks) or sizes["global_blocks"]) != tuple(
        geometry.values()
    ):
        logger.info("the release file's window %d and global blocks %s apply", *geometry.values())
    if not sizes["has_masks"] and not (training and cfg.model.mask_head):  # a box-only file (Objects365)
        geometry["mask_head"] = False
    cfg = replace(cfg, model=replace(cfg.model, **geometry))
    classes = num_classes or sizes["num_classes"]
    arch = arch_from_config(cfg, dims, classes)
    detector = EvaDetector(arch, fed_weights)
    renamed = detector_state_from_release(state, len(cfg.model.box_conv_dims))
    where = "the release detection checkpoint"
    _check_finite(renamed, where)
    fresh_prefix = "backbone.net." if backbone_only else ""
    own = _shapes(detector.state_dict())
    skipped = _fit(own, _shapes(renamed), where, new_classes=training, fresh_prefix=fresh_prefix)
    detector.load_state_dict({k: v for k, v in renamed.items() if k not in skipped}, strict=False)
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
        block = net.blocks[0]
        dims = {
            "embed_dim": net.embed_dim, "depth": len(net.blocks), "num_heads": block.attn.num_heads,
            "mlp_dim": block.mlp.fc1.out_features, "pos_grid": round((net.pos_embed.shape[1] - 1) ** 0.5),
        }  # fmt: skip
        detector = EvaDetector(arch_from_config(cfg, dims, num_classes or 80), fed_weights)
        detector.backbone.net.load_state_dict(net.state_dict())
        if path is not None:  # which of the detector's tensors are the pretrained encoder's
            loaded = sum(k.startswith(("blocks.", "patch_embed.", "pos_embed")) for k in encoder.state_dict())
            total = len(detector.state_dict())
            logger.info("model.init=%s: %d tensors loaded, %d start fresh", m.init, loaded, total - loaded)
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
