"""Every foreign-weights key map, dicts of tensors in and out, and the architectures read off shapes.

Sources: the EVA release (image, video, EVA-CLIP, detection), open_clip's EVA01, OpenAI and Hugging
Face CLIP towers; targets: flyeva's modules and timm's `Eva`. No file is read and no module built
here, and nothing from tasks or teachers is imported: they call these maps and build their modules.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flyeva.models.eva import EVA_SIZES, EvaSize
from flyeva.models.weights import WeightsError

logger = logging.getLogger(__name__)

MIM_ONLY_KEYS = ("mask_token", "lm_head.weight", "lm_head.bias")
OPENAI_HEAD_WIDTH = 64  # every OpenAI / open_clip CLIP tower uses 64-wide heads (ViT-L/14 vision: 16)


def block_count(state: dict[str, Tensor], prefix: str = "blocks.") -> int:
    """Number of transformer blocks: 1 + the largest index after `prefix`; ValueError when none."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))


def named_heads(embed_dim: int, depth: int, mlp_dim: int) -> int:
    """Attention heads of the named size with these shapes (heads cannot be read off the weights)."""
    for size in EVA_SIZES.values():
        if (size.embed_dim, size.depth, size.mlp_dim) == (embed_dim, depth, mlp_dim):
            return size.num_heads
    raise WeightsError(
        f"weights of width {embed_dim}, depth {depth}, MLP {mlp_dim} match no named size; "
        "pass the number of attention heads (--num-heads; model.num_heads in a video config)"
    )


def split_qkv_bias(key: str, value: Tensor) -> dict[str, Tensor]:
    """An MAE-style fused `qkv.bias` as EVA's q and v biases; EVA fixes the k bias at zero."""
    q_bias, k_bias, v_bias = value.chunk(3)
    if k_bias.abs().max() > 0:
        logger.warning("%s has a non-zero k bias; it is dropped (softmax is invariant to it)", key)
    return {key.replace("qkv.bias", "q_bias"): q_bias, key.replace("qkv.bias", "v_bias"): v_bias}


# ---------------------------------------------------------------------------------------------------
# Release EVA image encoders <-> flyeva <-> timm.


@dataclass
class ConversionNotes:
    """What a conversion changed, for the log and the user."""

    dropped: list[str] = field(default_factory=list)
    clip_head: Tensor | None = None


def release_to_flyeva(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], ConversionNotes]:
    """Map the release's encoder keys (MIM, fine-tuned, EVA-CLIP `visual.*`, MAE-style) onto flyeva names."""
    notes = ConversionNotes()
    if any(k.startswith("visual.") for k in state_dict):
        # EVA-CLIP: the vision tower is prefixed `visual.`; `visual.head` is the CLIP projection.
        notes.dropped += [k for k in state_dict if not k.startswith("visual.")]
        state_dict = {k.removeprefix("visual."): v for k, v in state_dict.items() if k.startswith("visual.")}
        if "head.weight" in state_dict:
            notes.clip_head = state_dict.pop("head.weight")
            state_dict.pop("head.bias", None)
            notes.dropped.append("visual.head")
    converted: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith("attn.qkv.bias"):
            converted.update(split_qkv_bias(key, value))
        elif key in ("fc_norm.weight", "fc_norm.bias") and "norm.weight" not in state_dict:
            # fine-tuned checkpoints keep the final norm as fc_norm
            converted[key.removeprefix("fc_")] = value
        elif key.startswith(("head.", "rel_pos_bias", "fc_norm.")) or key.endswith("relative_position_index"):
            notes.dropped.append(key)
        else:
            converted[key] = value
    return converted, notes


def infer_size(state_dict: dict[str, Tensor], num_heads: int | None = None) -> EvaSize:
    """Read the architecture off the weights; heads come from the registry when the shapes match one."""
    try:
        embed_dim, _, patch, _ = state_dict["patch_embed.proj.weight"].shape
        depth = block_count(state_dict)
        mlp_dim = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        grid = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    except (KeyError, ValueError) as error:
        raise WeightsError(f"not an EVA encoder state dict (missing {error}); check the file") from error
    if num_heads is None:
        num_heads = named_heads(embed_dim, depth, mlp_dim)
    return EvaSize(grid * patch, patch, embed_dim, depth, num_heads, mlp_dim)


def flyeva_to_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Encoder weights named as timm's avg-pooled `Eva` wants them (final norm -> `fc_norm`)."""
    return {
        k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v.detach().contiguous().cpu()
        for k, v in state.items()
        if k not in MIM_ONLY_KEYS
    }


# ---------------------------------------------------------------------------------------------------
# Release video checkpoints (`EVA-01/video`): Conv3d patch kernel [D, 3, t, p, p], mean-pooled fc_norm.

WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "visual.")


def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes that every key shares (DDP `module.`, `model.`, ...)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def release_video_state(
    raw: dict[str, Tensor], img_size: int = 224, num_heads: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict for `VideoEva`, its `arch`) from a release video checkpoint's state dict."""
    state: dict[str, Tensor] = {}
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


# ---------------------------------------------------------------------------------------------------
# EVA-CLIP checkpoints (after `extract_state_dict` unwraps `model` / `module` / `state_dict`):
# - the release (`EVA-CLIP/rei/eva_clip/model.py`, `eva_vit_model.py`): vision tower under `visual.`
#   with timm's EVA names and `visual.head` (Linear with bias, width -> embed_dim); text tower under
#   `text.` (CustomCLIP) or at the top level (CLIP); `logit_scale` at the top level and/or as
#   `text.logit_scale`, which the release's `load_checkpoint` copies over the top-level one;
# - open_clip's EVA01-g-14 (`open_clip/model_configs/EVA01-g-14.json`): timm's Eva under
#   `visual.trunk.` with its `head` as the projection, text under `text.`, `logit_scale`.

EVA_CLIP_RELEASE, OPEN_CLIP = "eva-clip-release", "open_clip"
# Keys of an open_clip / release CLIP text tower kept at the top level of the state dict.
TOP_LEVEL_TEXT_KEYS = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


@dataclass
class ClipParts:
    """A CLIP state dict split into flyeva's pieces."""

    layout: str
    visual: dict[str, Tensor]
    text: dict[str, Tensor]
    logit_scale: Tensor | None


def split_clip_state(state: dict[str, Tensor], source: str) -> ClipParts:
    """Vision (flyeva `visual.*` names, head included), text (open_clip names) and logit_scale."""
    if any(k.startswith("visual.trunk.") for k in state):
        layout, prefix = OPEN_CLIP, "visual.trunk."
        extra = sorted(k for k in state if k.startswith("visual.") and not k.startswith(prefix))
        if extra:  # a separate projection (timm_proj linear/mlp) is not EvaClip's head
            raise ValueError(
                f"{source}: open_clip vision keys {extra[:3]} are not EVA-CLIP's; use a timm_proj null model"
            )
    elif "visual.patch_embed.proj.weight" in state:
        layout, prefix = EVA_CLIP_RELEASE, "visual."
    else:
        raise ValueError(
            f"{source} holds no EVA vision tower (no visual.patch_embed / visual.trunk keys); flyeva reads "
            "EVA-CLIP release and open_clip EVA01 checkpoints, not OpenAI-style ViT CLIPs"
        )
    if any(".rope." in k or k.endswith("rope.freqs_cos") for k in state):
        raise ValueError(f"{source} is an EVA-02 CLIP (rotary embeddings); flyeva implements EVA-01 towers")
    visual = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if "text.token_embedding.weight" in state:
        text = {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    elif "token_embedding.weight" in state:
        text = {k: v for k, v in state.items() if k.startswith(TOP_LEVEL_TEXT_KEYS)}
    else:
        raise ValueError(
            f"{source} holds no CLIP text tower (no token_embedding.weight under text. or top level)"
        )
    # The release's loader moves `text.logit_scale` over the top-level one; do the same.
    logit_scale = state.get("text.logit_scale", state.get("logit_scale"))
    text.pop("logit_scale", None)
    text.pop("attn_mask", None)  # a buffer older open_clip versions saved; rebuilt from the context length
    return ClipParts(layout, visual, text, logit_scale)


def clip_text_arch(text: dict[str, Tensor], heads: int | None = None) -> dict[str, Any]:
    """An open_clip text tower's sizes; heads default to width / 64 (shapes cannot give them)."""
    vocab_size, width = text["token_embedding.weight"].shape
    return dict(
        width=width,
        heads=heads or max(1, width // OPENAI_HEAD_WIDTH),
        layers=block_count(text, "transformer.resblocks."),
        context_length=text["positional_embedding"].shape[0],
        vocab_size=vocab_size,
        mlp_ratio=text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
    )


# ---------------------------------------------------------------------------------------------------
# OpenAI and Hugging Face CLIP vision towers -> open_clip's `VisionTransformer` names.


def open_clip_visual_state(state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """The vision tower's keys without the `visual.` prefix; text keys are ignored."""
    if any(key.startswith("visual.") for key in state):
        return {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if "conv1.weight" in state:  # a bare vision tower
        return state
    if any(key.startswith("vision_model.") for key in state):
        raise WeightsError(
            f"{source} holds Hugging Face CLIP weights; pass the directory that holds it and its config.json"
        )
    raise WeightsError(
        f"{source} holds no CLIP vision tower (expected keys like 'visual.conv1.weight'); "
        f"first keys: {sorted(state)[:5]}"
    )


def openai_visual_arch(visual_state: dict[str, Tensor]) -> dict[str, Any]:
    """A ViT tower's flat arch from OpenAI-layout weights (as open_clip's openai loader infers it)."""
    width, _, patch_size, _ = visual_state["conv1.weight"].shape
    grid = round((visual_state["positional_embedding"].shape[0] - 1) ** 0.5)
    return dict(
        image_size=patch_size * grid,
        patch_size=patch_size,
        width=width,
        layers=sum(key.endswith(".attn.in_proj_weight") for key in visual_state),
        heads=width // OPENAI_HEAD_WIDTH,
        mlp_ratio=visual_state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        output_dim=visual_state["proj"].shape[1],
        act="quick_gelu",  # OpenAI CLIP was trained with QuickGELU (docs/recipes.md §9)
    )


_HF_NAMES = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_BLOCK_PREFIXES = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_QKV_KEY = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def hf_to_open_clip_visual(hf_state: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Map HF CLIP vision keys onto open_clip's `VisionTransformer` keys (text keys are ignored).
    Unknown `vision_model.*` keys are kept under their HF names so the shape check reports them."""
    if "visual_projection.weight" not in hf_state:
        raise WeightsError(
            f"{source} has no visual_projection.weight (a CLIPVisionModel without projection); save it as "
            "CLIPVisionModelWithProjection or CLIPModel: EVA's targets are projected (docs/recipes.md §3)"
        )
    visual = {"proj": hf_state["visual_projection.weight"].t().contiguous()}
    qkv_parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for hf_key, value in hf_state.items():
        if not hf_key.startswith("vision_model.") or hf_key.endswith("position_ids"):
            continue
        key = hf_key.removeprefix("vision_model.")
        block = _HF_BLOCK_KEY.fullmatch(key)
        if key in _HF_NAMES:
            visual[_HF_NAMES[key]] = value
        elif block and (qkv := _HF_QKV_KEY.fullmatch(block[2])):
            qkv_parts.setdefault((block[1], qkv[2]), {})[qkv[1]] = value
        elif block and (prefix := next((p for p in _HF_BLOCK_PREFIXES if block[2].startswith(p)), None)):
            rest = block[2].removeprefix(prefix)
            visual[f"transformer.resblocks.{block[1]}.{_HF_BLOCK_PREFIXES[prefix]}{rest}"] = value
        else:
            visual[hf_key] = value
    for (layer, kind), parts in qkv_parts.items():
        if set(parts) != {"q", "k", "v"}:
            raise WeightsError(f"{source}: layer {layer} lacks some of q/k/v_proj.{kind}")
        # nn.MultiheadAttention packs [q; k; v] along the output dimension.
        visual[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return visual


# ---------------------------------------------------------------------------------------------------
# Release detection checkpoints (`EVA-01/det`, detectron2 names) -> flyeva's `EvaDetector`, whose
# RPN and heads are torchvision's parts. Buffers detectron2 stores (pixel statistics, anchors) are
# dropped; any other unknown key is an error that names it.

DETECTRON2_DROPPED = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.")
# (detectron2 pattern, flyeva replacement)
_DETECTRON2_RULES = [
    (r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.", r"proposal_generator.head.conv.\1.0."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "proposal_generator.head.cls_logits."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "proposal_generator.head.bbox_pred."),
    (r"^roi_heads\.mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_heads\.mask_head\.predictor\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]


def _shift(match: re.Match, template: str) -> str:
    """conv1 -> 0 (torchvision's Sequential counts from 0, detectron2's names from 1)."""
    return template.format(stage=match.group(1), index=int(match.group(2)) - 1)


def detectron2_key(key: str, num_box_convs: int) -> str | None:
    """The flyeva name of one detectron2 key; None for buffers flyeva does not keep."""
    if key.startswith(DETECTRON2_DROPPED):
        return None
    if key.startswith(("backbone.", "roi_heads.box_predictor.")):
        return key  # same module tree
    for pattern, replacement in _DETECTRON2_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.conv(\d+)\.norm\.(weight|bias)$", key):
        return _shift(match, "roi_heads.box_head.{stage}.{index}.1.") + match.group(3)
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.conv(\d+)\.weight$", key):
        return _shift(match, "roi_heads.box_head.{stage}.{index}.0.weight")
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.fc1\.(weight|bias)$", key):
        # torchvision's FastRCNNConvFCHead: convs, Flatten, then the Linear
        return f"roi_heads.box_head.{match.group(1)}.{num_box_convs + 1}.{match.group(2)}"
    if match := re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(weight|bias)$", key):
        return f"roi_heads.mask_head.{int(match.group(1)) - 1}.1.{match.group(2)}"
    if match := re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.weight$", key):
        return f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.weight"
    raise ValueError(
        f"release detection checkpoint key {key!r} has no flyeva counterpart; is this an EVA-01/det file?"
    )


def is_release_detector(state: dict[str, Any]) -> bool:
    """A detectron2 EVA detector, or its ViTDet backbone alone (`backbone.net.*`)."""
    return any(k.startswith("backbone.net.blocks.") for k in state)


def detector_state_from_release(state: dict[str, Tensor], num_box_convs: int = 4) -> dict[str, Tensor]:
    """A detectron2 EVA Cascade Mask R-CNN state dict renamed to flyeva's `EvaDetector`."""
    renamed = {}
    for key, value in state.items():
        if (new_key := detectron2_key(key, num_box_convs)) is not None:
            renamed[new_key] = value
    return renamed


def release_detector_arch(state: dict[str, Tensor]) -> dict[str, Any]:
    """Backbone and head sizes read off a release detector state dict (for `default_arch` overrides)."""
    return {
        "embed_dim": state["backbone.net.patch_embed.proj.weight"].shape[0],
        "depth": block_count(state, "backbone.net.blocks."),
        "mlp_dim": state["backbone.net.blocks.0.mlp.fc1.weight"].shape[0],
        "patch_size": state["backbone.net.patch_embed.proj.weight"].shape[-1],
        "pos_grid": round((state["backbone.net.pos_embed"].shape[1] - 1) ** 0.5),
        "num_classes": state["roi_heads.box_predictor.0.cls_score.weight"].shape[0] - 1
        if "roi_heads.box_predictor.0.cls_score.weight" in state
        else None,  # a backbone-only file
        **_attention_geometry(state),
    }


def _attention_geometry(state: dict[str, Tensor]) -> dict[str, Any]:
    """Window size, global blocks and heads from the rel-pos tables: 2 window - 1 rows (more in global
    blocks), one column per channel of a head."""
    columns = state["backbone.net.blocks.0.attn.rel_pos_h"].shape[1]
    rows = [
        state[f"backbone.net.blocks.{i}.attn.rel_pos_h"].shape[0]
        for i in range(block_count(state, "backbone.net.blocks."))
    ]
    window_rows = min(rows)
    return {
        "window": (window_rows + 1) // 2,
        "global_blocks": [i for i, n in enumerate(rows) if n != window_rows],
        "num_heads": state["backbone.net.patch_embed.proj.weight"].shape[0] // columns,
    }
