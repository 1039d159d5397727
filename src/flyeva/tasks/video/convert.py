"""Where a video model's weights come from: an image encoder, a video folder, or a release video checkpoint.

The release's video checkpoints (`EVA-01/video`, {"model": state_dict}) use the image model's names
plus `patch_embed.proj.weight` [D, 3, t, p, p], `pos_embed` [1, 1 + T/t * N, D], `fc_norm.*` and
`head.*`; the architecture is read off the shapes.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from flyeva.models.checkpoint import extract_state_dict, load_any, load_weights, read_checkpoint
from flyeva.models.convert import block_count, named_heads, split_qkv_bias, strip_wrappers
from flyeva.models.eva import EvaSize, size_arch
from flyeva.models.weights import WeightsError, is_weights_folder, load, read_config, save_weights
from flyeva.tasks.video.model import build_from_arch

logger = logging.getLogger(__name__)


def release_video_state(
    raw: dict[str, torch.Tensor], img_size: int = 224, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict for `VideoEva`, its `arch`) from a release video checkpoint's state dict."""
    state: dict[str, torch.Tensor] = {}
    for key, value in strip_wrappers(raw).items():
        if key.endswith("attn.qkv.bias"):
            state.update(split_qkv_bias(key, value))
        elif key.startswith("norm.") or key.endswith("relative_position_index"):
            logger.info(
                "dropping %s (the release's video model has no per-token norm when mean pooling)", key
            )
        else:
            state[key] = value
    try:
        kernel = state["patch_embed.proj.weight"]
        depth = block_count(state)
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
        positions = state["pos_embed"].shape[1] - 1
    except (KeyError, ValueError) as error:
        raise WeightsError(f"not an EVA video state dict (missing {error}); check the file") from error
    if kernel.ndim != 5:
        raise WeightsError(
            f"patch_embed.proj.weight has shape {tuple(kernel.shape)}, not a Conv3d kernel; for image "
            "weights set model.init to the encoder and the model is inflated"
        )
    embed_dim, _, tubelet, patch, _ = kernel.shape
    grid = img_size // patch
    if positions % (grid * grid):
        raise WeightsError(
            f"pos_embed has {positions} patch positions, not a multiple of {grid}x{grid}; "
            "pass the checkpoint's image size (model.img_size)"
        )
    if num_heads is None:
        num_heads = named_heads(embed_dim, depth, mlp_dim)
    size = EvaSize(img_size, patch, embed_dim, depth, num_heads, mlp_dim)
    arch = {
        "size": size.__dict__,
        "num_classes": state["head.weight"].shape[0] if "head.weight" in state else 0,
        "num_frames": positions // (grid * grid) * tubelet,
        "tubelet_size": tubelet,
    }
    return state, arch


def normalise_class_name(name: str) -> str:
    """Kinetics lists spell classes differently ("air_drumming", '"air drumming"'): compare words."""
    return " ".join(re.sub(r"[_\"']+", " ", name).lower().split())


def map_classifier_rows(
    head: dict[str, torch.Tensor], source_classes: list[str], target_classes: list[str]
) -> dict[str, torch.Tensor]:
    """Rows of `head.weight`/`head.bias` picked by class name, as the release makes K400/600/700 heads of
    the K722 model's."""
    if head["head.weight"].shape[0] != len(source_classes):
        raise ValueError(
            f"the checkpoint head has {head['head.weight'].shape[0]} rows but {len(source_classes)} class "
            "names were given for it; pass the class list the checkpoint was trained on (model.init_classes)"
        )
    index = {normalise_class_name(name): row for row, name in enumerate(source_classes)}
    missing = [name for name in target_classes if normalise_class_name(name) not in index]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(target_classes)} classes are not in the checkpoint's classes "
            f"(e.g. {missing[:3]}); set model.reset_head=true to train a new head"
        )
    rows = torch.tensor([index[normalise_class_name(name)] for name in target_classes])
    return {"head.weight": head["head.weight"][rows], "head.bias": head["head.bias"][rows]}


def convert_release_video(
    src: str | Path, out: str | Path, num_heads: int | None = None, trust_pickle: bool = False
) -> Path | None:
    """A release video checkpoint (Conv3d patch kernel) -> a `video` weights folder; None when `src`
    holds image weights (the caller converts those)."""
    raw = extract_state_dict(read_checkpoint(src, trust_pickle=trust_pickle))
    kernel = strip_wrappers(raw).get("patch_embed.proj.weight")
    if kernel is None or kernel.ndim != 5:
        return None
    state, arch = release_video_state(raw, 224, num_heads)  # the release's video models run at 224
    model = build_from_arch(arch)
    load_weights(model, state)
    return save_weights(model, out, kind="video", arch=arch, source={"release": str(src)})


def load_init(
    path: str | Path, img_size: int = 224, num_heads: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(state, arch, kind) of `model.init`: a video folder or release video checkpoint ("video"),
    else an image encoder (MIM / encoder folder, release image checkpoint) ("image", arch = size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"model.init {path} does not exist; pass a weights folder or a checkpoint file"
        )
    if is_weights_folder(path):
        config = read_config(path)
        if config["kind"] == "video":
            return load(path).state_dict(), {**config["arch"], "classes": config.get("classes")}, "video"
    else:
        raw = extract_state_dict(read_checkpoint(path))
        kernel = strip_wrappers(raw).get("patch_embed.proj.weight")
        if kernel is not None and kernel.ndim == 5:
            return (*release_video_state(raw, img_size, num_heads), "video")
    encoder = load_any(path, kind="encoder")
    return encoder.state_dict(), {"size": size_arch(encoder)["size"]}, "image"
