"""Foreign EVA-CLIP checkpoints (the release's, open_clip's EVA01) -> flyeva's EvaClip.

Key maps are `flyeva.models.convert.split_clip_state`'s. Shapes give every size but the numbers of
heads: vision heads from a named size (or `num_heads`), text heads width / 64 (or `text_heads`).
The text activation cannot be read off the weights: see `resolve_text_activation`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from flyeva.models.checkpoint import extract_state_dict, load_weights, read_checkpoint
from flyeva.models.convert import (
    EVA_CLIP_RELEASE,
    clip_text_arch,
    infer_size,
    release_to_flyeva,
    split_clip_state,
)
from flyeva.models.eva import EVA_SIZES
from flyeva.tasks.clip.model import (
    ClipModelSection,
    EvaClip,
    TextSection,
    VisionSection,
    build_clip,
    load_clip,
)

logger = logging.getLogger(__name__)

TEXT_ACTIVATIONS = {"gelu": False, "quickgelu": True}  # --text-act value -> TextSection.quick_gelu


def resolve_text_activation(
    text_act: str | None, layout: str, sidecar: dict[str, Any] | None
) -> tuple[bool, str]:
    """(quick_gelu, why): a flag wins; else the open_clip model config next to the file; else GELU for
    the release layout (it builds every text tower with nn.GELU); else an error (OpenAI-initialised
    open_clip towers may use QuickGELU)."""
    told = None if sidecar is None else bool(sidecar.get("quick_gelu", False))
    if text_act is not None:
        if text_act not in TEXT_ACTIVATIONS:
            raise ValueError(f"--text-act {text_act!r} is not one of {sorted(TEXT_ACTIVATIONS)}")
        if told is not None and told != TEXT_ACTIVATIONS[text_act]:
            raise ValueError(f"--text-act {text_act} contradicts the file's open_clip config; drop the flag")
        return TEXT_ACTIVATIONS[text_act], f"--text-act {text_act}"
    if told is not None:
        return told, "the open_clip model config next to the file"
    if layout == EVA_CLIP_RELEASE:
        return False, "EVA-CLIP release layout: its text towers use GELU (pass --text-act quickgelu if not)"
    raise ValueError(
        "the checkpoint does not say its text activation: pass --text-act gelu (EVA-CLIP, open_clip "
        "EVA01-g-14) or --text-act quickgelu (OpenAI CLIP-L text weights); a wrong one gives wrong features"
    )


def clip_from_state_dict(
    state: dict[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    text_act: str | None = None,
    num_heads: int | None = None,
    text_heads: int | None = None,
    sidecar: dict[str, Any] | None = None,
) -> tuple[EvaClip, ClipModelSection, dict[str, Any]]:
    """An EvaClip holding a foreign CLIP state dict exactly; returns (model, its section, provenance).

    `sidecar`: the open_clip model config next to the file (text activation, numbers of heads)."""
    if sidecar is not None:  # the numbers of heads the shapes cannot give
        vision_heads, sidecar_text_heads = heads_from_sidecar(sidecar)
        num_heads, text_heads = num_heads or vision_heads, text_heads or sidecar_text_heads
    parts = split_clip_state(state, source)
    head = {k: parts.visual.pop(k) for k in ("head.weight", "head.bias") if k in parts.visual}
    if "head.weight" not in head:
        raise ValueError(
            f"{source}: the vision tower has no head (visual.head.weight), the CLIP image projection"
        )
    encoder, notes = release_to_flyeva(parts.visual)
    if notes.dropped:  # e.g. fc_norm of a mean-pooled tower: EvaClip pools the CLS token
        raise ValueError(f"{source}: vision weights EvaClip has no place for: {', '.join(notes.dropped[:5])}")
    quick_gelu, why = resolve_text_activation(text_act, parts.layout, sidecar)
    size = infer_size(encoder, num_heads)
    named = next((name for name, known in EVA_SIZES.items() if known == size), None)
    vision = VisionSection(size=named) if named else VisionSection(size=asdict(size), img_size=size.img_size)
    text = TextSection(**clip_text_arch(parts.text, text_heads), quick_gelu=quick_gelu)
    section = ClipModelSection(embed_dim=head["head.weight"].shape[0], vision=vision, text=text)
    model = build_clip(section, release_init=False)
    if "head.bias" not in head:
        head["head.bias"] = torch.zeros(section.embed_dim)  # open_clip-style bias-free projection
    load_weights(model.visual, {**encoder, **head})
    load_weights(model.text, parts.text)
    if parts.logit_scale is None:
        logger.warning(
            "%s has no logit_scale: logits use CLIP's initial 1/0.07 (embeddings are unaffected)", source
        )
    else:
        model.logit_scale.data.copy_(parts.logit_scale.reshape(()).float())
    activation = "QuickGELU" if quick_gelu else "GELU"
    provenance = {"file": source, "layout": parts.layout, "text_activation": activation}
    return model.eval(), section, {**provenance, "text_activation_from": why}


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The open_clip model config written next to an exported file (`NAME.json` beside `NAME.safetensors`)."""
    sidecar = path.with_suffix(".json")
    if path.suffix == ".json" or not sidecar.is_file():
        return None
    config = json.loads(sidecar.read_text())
    return config if isinstance(config, dict) and "text_cfg" in config else None


def heads_from_sidecar(sidecar: dict[str, Any]) -> tuple[int | None, int | None]:
    """(vision heads, text heads) from an open_clip model config and its timm `local-dir:` folder."""
    text_heads = sidecar["text_cfg"].get("heads")
    timm_name = str(sidecar.get("vision_cfg", {}).get("timm_model_name", ""))
    timm_config = Path(timm_name.removeprefix("local-dir:")) / "config.json"
    if not timm_name.startswith("local-dir:") or not timm_config.is_file():
        return None, text_heads
    return json.loads(timm_config.read_text()).get("model_args", {}).get("num_heads"), text_heads


def load_any_clip(
    path: str | Path,
    *,
    text_act: str | None = None,
    num_heads: int | None = None,
    text_heads: int | None = None,
    trust_pickle: bool = False,
) -> tuple[EvaClip, ClipModelSection, dict[str, Any]]:
    """A flyeva CLIP folder, an EVA-CLIP release checkpoint, or an open_clip EVA01 checkpoint."""
    path = Path(path)
    if path.is_dir():
        model, section = load_clip(path)
        return model, section, {"file": str(path), "layout": "flyeva"}
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP checkpoint {path} does not exist; pass a flyeva folder or a checkpoint file"
        )
    state = extract_state_dict(read_checkpoint(path, trust_pickle=trust_pickle))
    reading = dict(text_act=text_act, num_heads=num_heads, text_heads=text_heads)
    return clip_from_state_dict(state, source=str(path), sidecar=read_sidecar(path), **reading)
