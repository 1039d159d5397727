"""EVA-CLIP: an EVA vision tower and open_clip's text tower (docs/recipes.md section 5, "EVA-CLIP").

The vision tower is timm's `Eva` with `num_classes=embed_dim`: its final-norm CLS token goes through
`head` (Linear D -> embed_dim) and its keys are exactly the release's `visual.*` / `visual.head.*`.
The text tower is `open_clip.transformer.TextTransformer`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from flyeva.engine.optim import param_groups
from flyeva.models.checkpoint import CheckpointError, load_weights
from flyeva.models.eva import EvaSize, build_encoder, get_size, size_with
from flyeva.models.weights import load, save_weights
from flyeva.teachers.eva_tower import LEGACY_CLIP_CONFIG, LEGACY_CLIP_WEIGHTS, is_eva_clip_folder

LEGACY_CLIP_FORMAT = "flyeva-clip-v1"  # the two-file layout's `format`: `load_clip` reads it
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100
TEXT_SHAPE = ("width", "heads", "layers", "context_length", "vocab_size", "mlp_ratio")  # TextSection's arch


@dataclass
class VisionSection:
    """The EVA vision tower and its optimiser settings."""

    size: str = "eva_giant"  # docs/recipes.md section 5: EVA-CLIP's vision tower is EVA-g
    img_size: int = 0  # 0 = the size's own (224)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    init: str = ""  # flyeva MIM/encoder folder or release checkpoint; "" = random (release init)
    lr: float | None = None  # None = optim.lr
    weight_decay: float | None = None  # None = optim.weight_decay
    layer_decay: float = 1.0  # lr x decay^(depth + 1 - layer), as in docs/recipes.md section 4


@dataclass
class TextSection:
    """open_clip's text transformer; defaults are OpenAI CLIP-L's (docs/recipes.md section 5)."""

    width: int = 768
    heads: int = 12
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408  # open_clip's bundled BPE vocabulary
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI CLIP weights need QuickGELU (docs/recipes.md section 9)
    grad_checkpointing: bool = False
    init: str = ""  # open_clip CLIP state dict (.pt/.bin/.safetensors) holding the text keys
    lr: float | None = None  # None = optim.lr
    weight_decay: float | None = None  # None = optim.weight_decay
    layer_decay: float = 1.0


@dataclass
class ClipModelSection:
    embed_dim: int = 1024  # docs/recipes.md section 5: Linear D -> 1024
    vision: VisionSection = field(default_factory=VisionSection)
    text: TextSection = field(default_factory=TextSection)
    init_logit_scale: float = INIT_LOGIT_SCALE
    max_logit_scale: float = MAX_LOGIT_SCALE


class EvaClip(nn.Module):
    """CLIP with an EVA vision tower (`visual`, timm Eva) and an open_clip text tower (`text`); `forward`
    returns the L2-normalised image and text features and exp(logit_scale), as open_clip's `CLIP`."""

    def __init__(self, visual: nn.Module, text: nn.Module, init_logit_scale: float, max_logit_scale: float):
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # 0-d, as in open_clip
        self.max_logit_scale = max_logit_scale

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = self.text(tokens)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, text = self.encode_image(images, normalize=True), self.encode_text(tokens, normalize=True)
        return image, text, self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, max_logit_scale], as open_clip does after every step."""
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))


def build_text_tower(cfg: TextSection, embed_dim: int) -> nn.Module:
    """open_clip's `TextTransformer` projecting to `embed_dim` (random init)."""
    from open_clip.transformer import QuickGELU, TextTransformer  # lazy: open_clip takes seconds to import

    if cfg.width % cfg.heads:
        raise ValueError(f"text width {cfg.width} is not divisible by text heads {cfg.heads}")
    shape = {k: getattr(cfg, k) for k in TEXT_SHAPE}
    text = TextTransformer(**shape, output_dim=embed_dim, act_layer=QuickGELU if cfg.quick_gelu else nn.GELU)
    text.set_grad_checkpointing(cfg.grad_checkpointing)
    return text


def vision_size(vision: VisionSection) -> EvaSize:
    """The vision tower's architecture: a named size (or, for converted towers, a dict of its fields)."""
    size = EvaSize(**vision.size) if isinstance(vision.size, dict) else get_size(vision.size)
    return size_with(size, img_size=vision.img_size) if vision.img_size else size


def build_clip(cfg: ClipModelSection, *, release_init: bool = True) -> EvaClip:
    """A randomly initialised EvaClip (EVA's release init; `release_init=False`: timm's, faster, for weights
    loaded next)."""
    visual = build_encoder(
        vision_size(cfg.vision),
        drop_path_rate=cfg.vision.drop_path_rate,
        grad_checkpointing=cfg.vision.grad_checkpointing,
        release_init=release_init,
        num_classes=cfg.embed_dim,  # `head`: CLS token -> embed_dim (docs/recipes.md section 5)
    )
    text = build_text_tower(cfg.text, cfg.embed_dim)
    return EvaClip(visual, text, cfg.init_logit_scale, cfg.max_logit_scale)


def text_layer_id(name: str, num_layers: int) -> int:
    """Layer of a text-tower parameter: embeddings 0, block i -> i + 1, ln_final/projection last."""
    if name.startswith(("token_embedding", "positional_embedding", "cls_emb")):
        return 0
    if name.startswith("transformer.resblocks."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def clip_param_groups(
    model: EvaClip, vision: VisionSection, text: TextSection, lr: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: per tower its lr (as lr_scale), weight and layer decay; logit_scale at `lr`, no decay."""
    text_layers = {"num_layers": len(model.text.transformer.resblocks), "layer_id_fn": text_layer_id}
    groups = []
    for prefix, section, layers in (("visual", vision, {}), ("text", text, text_layers)):
        decay = weight_decay if section.weight_decay is None else section.weight_decay
        scale = (lr if section.lr is None else section.lr) / lr
        tower = getattr(model, prefix)
        groups += param_groups(
            tower, decay, layer_decay=section.layer_decay, lr_scale=scale, prefix=f"{prefix}.", **layers
        )
    if model.logit_scale.requires_grad:
        logit_scale = {"params": [model.logit_scale], "param_names": ["logit_scale"]}
        groups.append({**logit_scale, "weight_decay": 0.0, "lr_scale": 1.0, "layer_id": 0})
    return groups


def arch_dict(cfg: ClipModelSection) -> dict[str, Any]:
    """What rebuilds the architecture (init paths and optimiser settings left out)."""
    vision = {k: getattr(cfg.vision, k) for k in ("size", "img_size")}
    text = {k: getattr(cfg.text, k) for k in (*TEXT_SHAPE, "quick_gelu")}
    return {
        "embed_dim": cfg.embed_dim,
        "vision": vision,
        "text": text,
        "max_logit_scale": cfg.max_logit_scale,
    }


def section_from_arch(arch: dict[str, Any]) -> ClipModelSection:
    """The model section of an `arch` dict (a tower of no named size: `size` is a dict of `EvaSize`)."""
    vision = dict(arch["vision"])
    if isinstance(vision["size"], dict) and not vision.get("img_size"):
        vision["img_size"] = vision["size"]["img_size"]
    return ClipModelSection(
        embed_dim=arch["embed_dim"],
        vision=VisionSection(**vision),
        text=TextSection(**arch["text"]),
        max_logit_scale=arch.get("max_logit_scale", MAX_LOGIT_SCALE),
    )


def build_from_arch(arch: dict[str, Any]) -> EvaClip:
    """An EvaClip of the architecture `arch` at timm/open_clip init (the builder `weights.load` uses)."""
    return build_clip(section_from_arch(arch), release_init=False)


def save_clip(model: EvaClip, cfg: ClipModelSection, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `model` as a flyeva weights folder of kind "clip" (`model.safetensors` + `config.json`)."""
    extra = dict(extra or {})
    source = extra.pop("source", None)
    return save_weights(model, out_dir, kind="clip", arch=arch_dict(cfg), source=source, extra=extra)


def _load_legacy_clip(folder: Path) -> tuple[EvaClip, ClipModelSection]:
    """A folder in the two-file layout (`clip.json` + `clip.safetensors`, weights format 1)."""
    config = json.loads((folder / LEGACY_CLIP_CONFIG).read_text())
    if config.get("format") != LEGACY_CLIP_FORMAT:
        raise CheckpointError(
            f"{folder / LEGACY_CLIP_CONFIG} is not a flyeva CLIP config (format {config.get('format')!r})"
        )
    cfg = section_from_arch(config["arch"])
    model = build_clip(cfg, release_init=False)
    load_weights(model, load_file(str(folder / LEGACY_CLIP_WEIGHTS)))
    return model, cfg


is_clip_folder = is_eva_clip_folder  # one definition, in teachers/eva_tower.py


def load_clip(path: str | Path) -> tuple[EvaClip, ClipModelSection]:
    """Load a flyeva EVA-CLIP folder (`flyeva clip train`'s OUTPUT/final, `flyeva clip convert`'s --out),
    also one in the two-file layout."""
    folder = Path(path)
    if (folder / LEGACY_CLIP_CONFIG).is_file():
        return _load_legacy_clip(folder)
    if not is_clip_folder(folder):
        raise CheckpointError(
            f"{folder} is not a flyeva CLIP folder (no config.json of kind 'clip'); pass `flyeva clip "
            "train`'s OUTPUT/final, or convert a release file with `flyeva clip convert FILE --out DIR`"
        )
    model = load(folder, kind="clip")
    return model, section_from_arch(model.weights_config["arch"])
