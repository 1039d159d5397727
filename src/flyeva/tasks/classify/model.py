"""The image classifier: timm's `Eva` with a pooled head, initialised from pretrained encoder weights.

Pooling: `avg` = mean of the patch tokens (CLS excluded) -> `fc_norm` -> head, the release's
fine-tuning head; `cls` = the CLS token -> head. `final_norm` says where the checkpoint's final
`norm` goes: into `fc_norm` (default, as timm's `checkpoint_filter_fn`), nowhere (`drop`, the
release on a MIM checkpoint), or it stays on every token (`keep`); docs/classify.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.models.eva import Eva
from torch import nn

from flyeva.models.checkpoint import (
    CheckpointError,
    extract_state_dict,
    load_any,
    load_weights,
    read_checkpoint,
)
from flyeva.models.convert import MIM_ONLY_KEYS, infer_size, release_to_flyeva
from flyeva.models.eva import EvaSize, build_encoder, set_image_size, size_arch
from flyeva.models.weights import is_weights_folder, load, read_config, save_weights

logger = logging.getLogger(__name__)

POOLS = ("avg", "cls")
FINAL_NORMS = ("fc_norm", "drop", "keep")
HEAD_KEYS = ("head.weight", "head.bias")
HEAD_INIT_SCALE = 0.001  # docs/recipes.md §4: head init scale 0.001 (timm's head_init_scale)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@torch.no_grad()
def init_head(head: nn.Linear, scale: float = HEAD_INIT_SCALE) -> None:
    """The release's head init: trunc_normal(std 0.02) times `scale`, zero bias (docs/recipes.md §4)."""
    nn.init.trunc_normal_(head.weight, std=0.02)
    head.weight.mul_(scale)
    nn.init.zeros_(head.bias)


def build_classifier(
    size: EvaSize | str,
    num_classes: int,
    *,
    pool: str = "avg",
    final_norm: str = "fc_norm",
    drop_path_rate: float = 0.0,
    head_init_scale: float = HEAD_INIT_SCALE,
    grad_checkpointing: bool = False,
    release_init: bool = True,
) -> Eva:
    """A timm `Eva` classifier of a named size with a freshly initialised head."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    check_choice("model.pool", pool, POOLS)
    check_choice("model.final_norm", final_norm, FINAL_NORMS)
    model = build_encoder(
        size,
        drop_path_rate=drop_path_rate,
        grad_checkpointing=grad_checkpointing,
        release_init=release_init,
        num_classes=num_classes,
        global_pool="avg" if pool == "avg" else "token",
        use_fc_norm=final_norm != "keep",  # True turns timm's per-token `norm` off (Identity)
    )
    init_head(model.head, head_init_scale)  # release_init re-initialised every Linear, the head too
    return model


@dataclass
class PretrainedWeights:
    """Encoder weights (final norm as `norm.*`), their architecture, and a classification head if any."""

    encoder_state: dict[str, torch.Tensor]
    size: EvaSize
    head_state: dict[str, torch.Tensor] | None = None
    classes: list[str] | None = None
    source: str = ""


def load_pretrained(path: str | Path, num_heads: int = 0) -> PretrainedWeights:
    """Weights to start from: a flyeva folder (MIM, encoder or classifier) or a release checkpoint
    (`num_heads` only for a release checkpoint of a size `flyeva models` does not name)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"model.init {path} does not exist; pass a flyeva weights folder or a checkpoint file"
        )
    if is_weights_folder(path):
        config = read_config(path)
        if config["kind"] != "classifier":
            encoder = load_any(path, kind="encoder")
            return PretrainedWeights(
                encoder.state_dict(), EvaSize(**size_arch(encoder)["size"]), source=str(path)
            )
        state = load(path).state_dict()
        head = {k: state.pop(k) for k in HEAD_KEYS if k in state}
        if "fc_norm.weight" in state:  # the final norm, wherever the classifier kept it, becomes `norm`
            state["norm.weight"], state["norm.bias"] = state.pop("fc_norm.weight"), state.pop("fc_norm.bias")
        size = EvaSize(**config.get("arch", config)["size"])  # format 1 kept `size` at the top level
        return PretrainedWeights(state, size, head or None, config.get("classes"), str(path))
    raw = extract_state_dict(read_checkpoint(path))
    head = {k: raw.pop(k) for k in HEAD_KEYS if k in raw}  # a release fine-tuned head (e.g. IN-21K)
    state, notes = release_to_flyeva(raw)
    if notes.dropped:
        logger.info("dropped %d checkpoint keys: %s", len(notes.dropped), ", ".join(notes.dropped[:8]))
    state = {k: v for k, v in state.items() if k not in MIM_ONLY_KEYS}
    return PretrainedWeights(state, infer_size(state, num_heads or None), head or None, source=str(path))


def classifier_state(encoder_state: dict[str, torch.Tensor], final_norm: str) -> dict[str, torch.Tensor]:
    """Encoder weights renamed for the classifier layout of `final_norm` (see the module docstring)."""
    check_choice("model.final_norm", final_norm, FINAL_NORMS)
    state = {k: v for k, v in encoder_state.items() if not k.startswith("norm.")}
    if final_norm == "fc_norm":
        state.update({f"fc_{k}": v for k, v in encoder_state.items() if k.startswith("norm.")})
    elif final_norm == "keep":
        state.update({k: v for k, v in encoder_state.items() if k.startswith("norm.")})
    return state


def classifier_from_pretrained(
    weights: PretrainedWeights,
    num_classes: int,
    *,
    pool: str = "avg",
    final_norm: str = "fc_norm",
    reset_head: bool = False,
    img_size: int = 0,
    drop_path_rate: float = 0.0,
    head_init_scale: float = HEAD_INIT_SCALE,
    grad_checkpointing: bool = False,
) -> Eva:
    """Build the classifier at the checkpoint's resolution, load it strictly, then resize to `img_size`."""
    model = build_classifier(
        weights.size,
        num_classes,
        pool=pool,
        final_norm=final_norm,
        drop_path_rate=drop_path_rate,
        head_init_scale=head_init_scale,
        grad_checkpointing=grad_checkpointing,
        release_init=False,
    )
    state = classifier_state(weights.encoder_state, final_norm)
    fresh = ["head."] + (["fc_norm."] if final_norm == "drop" else [])
    if weights.head_state is not None and not reset_head:
        checkpoint_classes = weights.head_state["head.weight"].shape[0]
        if checkpoint_classes != num_classes:
            raise ValueError(
                f"{weights.source} has a {checkpoint_classes}-class head but the data has {num_classes} "
                "classes; set model.reset_head=true to train a new head (e.g. IN-21K -> IN-1K), "
                "or train on the data the head was made for"
            )
        state.update(weights.head_state)
        fresh.remove("head.")
    load_weights(model, state, ignore_missing=tuple(fresh))
    if img_size and img_size != weights.size.img_size:
        set_image_size(model, img_size)  # position embeddings resized bicubically (336/560 fine-tunes)
    return model


def freeze_patch_embed(model: Eva) -> None:
    """Stop training the patch embedding (the release's default `stop_grad_conv1`; off in flyeva)."""
    model.patch_embed.requires_grad_(False)


def timm_kwargs(model: Eva) -> dict[str, Any]:
    """Everything `timm.models.eva.Eva(**kwargs)` needs to rebuild `model`'s architecture."""
    size = size_arch(model)["size"]
    kwargs: dict[str, Any] = {k: size[k] for k in ("img_size", "patch_size", "embed_dim", "depth")}
    kwargs.update(num_heads=size["num_heads"], mlp_ratio=size["mlp_dim"] / size["embed_dim"])
    kwargs.update(num_classes=model.num_classes, global_pool=model.global_pool)
    has_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    if has_fc_norm != (model.global_pool == "avg"):  # timm's default: fc_norm exactly when pooling avg
        kwargs["use_fc_norm"] = has_fc_norm
    return kwargs


def save_classifier(model: Eva, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """A flyeva weights folder of kind "classifier": timm's names, rebuilt from timm's kwargs."""
    arch = {"timm_kwargs": timm_kwargs(model), **size_arch(model)}
    return save_weights(model, out_dir, kind="classifier", arch=arch, extra=extra)


def build_from_arch(arch: dict[str, Any]) -> Eva:
    """The classifier a weights folder describes (the `classifier` kind of models/weights.py)."""
    return Eva(**arch["timm_kwargs"], qkv_bias=True)


def load_classifier(path: str | Path) -> tuple[Eva, dict[str, Any]]:
    """A classifier written by `save_classifier` (or in the format-1 layout), and its config."""
    config = read_config(path)
    if config.get("kind") != "classifier":
        raise CheckpointError(
            f"{path} holds no flyeva classifier; pass the `final` folder of `flyeva classify finetune`"
        )
    return load(path), config


def export_timm_classifier(model: Eva, path: str | Path) -> tuple[Path, str]:
    """A safetensors file timm's `Eva` loads strictly, and the line that builds that `Eva`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs(model).items())
    recipe = (
        f"model = timm.models.eva.Eva({args}); "
        f"model.load_state_dict(safetensors.torch.load_file({str(path)!r}))"
    )
    return path, recipe
