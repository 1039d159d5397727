"""Foreign key maps of the encoder and the CLIP towers (dicts of tensors in and out), sizes read off shapes.

Sources: the EVA release (image encoders, EVA-CLIP), open_clip's EVA01, OpenAI and Hugging Face CLIP
towers; targets: flyeva's modules and timm's `Eva`. No file is read and no module built here.
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


WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "visual.")


def strip_wrappers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove prefixes that every key shares (DDP `module.`, `model.`, ...)."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


# EVA-CLIP checkpoints: the release's (`EVA-CLIP/rei/eva_clip/model.py`) has the vision tower under
# `visual.` with `visual.head` as projection, the text tower under `text.` (CustomCLIP) or at the top
# level (CLIP); open_clip's EVA01-g-14 has timm's Eva under `visual.trunk.` and text under `text.`.

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
