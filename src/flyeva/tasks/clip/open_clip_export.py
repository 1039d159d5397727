"""flyeva's EvaClip -> open_clip: a state dict `open_clip.create_model(NAME, pretrained=FILE)` loads.

open_clip's EVA01-g-14 is a CustomTextCLIP whose vision tower wraps timm's `eva_giant_patch14_224`
with `timm_pool: token`, `timm_proj: null`: exactly EvaClip's `visual` under `visual.trunk.`. A vision
tower that is not EVA-g at 224 px points timm at a `local-dir:` folder holding the sizes (timm >= 1.0.16).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flyeva.models.eva import get_size
from flyeva.tasks.clip.model import ClipModelSection, EvaClip, vision_size

OPEN_CLIP_EVA_G = "EVA01-g-14"
TIMM_EVA_G = "eva_giant_patch14_224"  # the timm model EVA01-g-14 wraps
# EVA01-g-14's text tower: OpenAI CLIP-L's shape with open_clip's default GELU.
EVA01_G_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
OPEN_CLIP_TEXT_KEYS = ("context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio")


@dataclass
class OpenClipExport:
    """What `export_open_clip` wrote and the one line that loads it."""

    weights: Path
    model_config: Path
    timm_folder: Path | None
    recipe: str


def open_clip_state_dict(model: EvaClip) -> dict[str, torch.Tensor]:
    """EvaClip's weights under open_clip's CustomTextCLIP names (timm trunk under `visual.trunk.`)."""
    state = {f"visual.trunk.{k}": v for k, v in model.visual.state_dict().items()}
    state.update({f"text.{k}": v for k, v in model.text.state_dict().items()})
    state["logit_scale"] = model.logit_scale.detach()
    return {k: v.detach() for k, v in state.items()}


def is_open_clip_eva_g(cfg: ClipModelSection) -> bool:
    """Whether open_clip's built-in EVA01-g-14 config describes this model exactly."""
    text = {k: getattr(cfg.text, k) for k in OPEN_CLIP_TEXT_KEYS}
    eva_g = vision_size(cfg.vision) == get_size("eva_giant") and cfg.embed_dim == 1024
    return eva_g and text == {**EVA01_G_TEXT, "mlp_ratio": 4.0} and not cfg.text.quick_gelu


def open_clip_model_config(cfg: ClipModelSection, timm_name: str) -> dict[str, Any]:
    """An open_clip model config (the EVA01-g-14 JSON's shape) describing `cfg`."""
    config: dict[str, Any] = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": vision_size(cfg.vision).img_size,
            "timm_model_name": timm_name,
            "timm_model_pretrained": False,
            "timm_pool": "token",
            "timm_proj": None,
        },
        "text_cfg": {k: getattr(cfg.text, k) for k in OPEN_CLIP_TEXT_KEYS},
        "custom_text": True,
    }
    if cfg.text.quick_gelu:
        config["quick_gelu"] = True  # open_clip passes it to the text tower (timm towers ignore it)
    return config


def export_open_clip(model: EvaClip, cfg: ClipModelSection, out_file: str | Path) -> OpenClipExport:
    """Write `out_file` (.safetensors, or a torch file) and the open_clip model config NAME.json (NAME =
    the file's stem) next to it; EVA-g at 224 px with EVA01-g-14's text tower loads as "EVA01-g-14"."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in open_clip_state_dict(model).items()}
    if out_file.suffix == ".safetensors":
        save_file(state, str(out_file))
    else:
        torch.save(state, out_file)
    timm_folder, timm_name = None, TIMM_EVA_G
    if vision_size(cfg.vision) != get_size("eva_giant"):
        timm_folder = out_file.with_name(f"{out_file.stem}_timm")
        timm_folder.mkdir(exist_ok=True)
        args = asdict(vision_size(cfg.vision))  # timm `Eva` arguments; the rest is the EVA-g entry's default
        args["mlp_ratio"] = args.pop("mlp_dim") / args["embed_dim"]
        timm_config = {"architecture": TIMM_EVA_G, "model_args": args, "pretrained_cfg": {}}
        (timm_folder / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
        timm_name = f"local-dir:{timm_folder.resolve()}"
    model_config = out_file.with_suffix(".json")
    model_config.write_text(json.dumps(open_clip_model_config(cfg, timm_name), indent=2) + "\n")
    builtin = is_open_clip_eva_g(cfg)
    name = OPEN_CLIP_EVA_G if builtin else out_file.stem
    recipe = f'open_clip.create_model("{name}", pretrained="{out_file}")'
    if not builtin:
        recipe = f'open_clip.add_model_config("{model_config}"); {recipe}'
    return OpenClipExport(out_file, model_config, timm_folder, recipe)
