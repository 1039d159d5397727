"""EVA-CLIP: an EVA vision tower and open_clip's text tower (EVA_SPEC section 4, "EVA-CLIP").

The vision tower is timm's `Eva` (the flyeva encoder) with `num_classes=embed_dim`, so its CLS
token after the final norm goes through `head` (Linear D -> embed_dim) and its keys are exactly
the release's `visual.*` / `visual.head.*`. The text tower is `open_clip.transformer.TextTransformer`
(CLIP-L's: 12 layers, width 768, 12 heads, context 77, vocab 49408). The learnable temperature is
CLIP's: log(1/0.07) at init, exp() clamped at 100.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flyeva.engine.optim import param_groups
from flyeva.models.checkpoint import (
    FLYEVA_CONFIG,
    FLYEVA_WEIGHTS,
    MIM_ONLY_KEYS,
    CheckpointError,
    extract_state_dict,
    load_weights,
    read_checkpoint,
    release_to_flyeva,
)
from flyeva.models.eva import build_encoder, get_size, size_with

logger = logging.getLogger(__name__)

CLIP_WEIGHTS = "clip.safetensors"
CLIP_CONFIG = "clip.json"
CLIP_FORMAT = "flyeva-clip-v1"
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100
# Keys of an open_clip CLIP state dict that belong to the text tower (they sit at the top level).
TEXT_KEY_PREFIXES = (
    "token_embedding.",
    "positional_embedding",
    "transformer.",
    "ln_final.",
    "text_projection",
)


@dataclass
class VisionSection:
    """The EVA vision tower and its optimiser settings."""

    size: str = "eva_giant"  # EVA_SPEC section 4: EVA-CLIP's vision tower is EVA-g
    img_size: int = 0  # 0 = the size's own (224)
    drop_path_rate: float = 0.0
    grad_checkpointing: bool = False
    init: str = ""  # flyeva MIM/encoder folder or release checkpoint; "" = random (release init)
    lr: float | None = None  # None = optim.lr
    weight_decay: float | None = None  # None = optim.weight_decay
    layer_decay: float = 1.0  # lr x decay^(depth + 1 - layer), as in EVA_SPEC section 4


@dataclass
class TextSection:
    """open_clip's text transformer; defaults are OpenAI CLIP-L's (EVA_SPEC section 4)."""

    width: int = 768
    heads: int = 12
    layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408  # open_clip's bundled BPE vocabulary
    mlp_ratio: float = 4.0
    quick_gelu: bool = True  # OpenAI CLIP weights need QuickGELU (EVA_SPEC section 5)
    grad_checkpointing: bool = False
    init: str = ""  # open_clip CLIP state dict (.pt/.bin/.safetensors) holding the text keys
    lr: float | None = None  # None = optim.lr
    weight_decay: float | None = None  # None = optim.weight_decay
    layer_decay: float = 1.0


@dataclass
class ClipModelSection:
    embed_dim: int = 1024  # EVA_SPEC section 4: Linear D -> 1024
    vision: VisionSection = field(default_factory=VisionSection)
    text: TextSection = field(default_factory=TextSection)
    init_logit_scale: float = INIT_LOGIT_SCALE
    max_logit_scale: float = MAX_LOGIT_SCALE


class EvaClip(nn.Module):
    """CLIP with an EVA vision tower (`visual`, timm Eva) and an open_clip text tower (`text`).

    `forward(images, tokens)` returns L2-normalised image and text features and exp(logit_scale),
    like open_clip's `CLIP`; `encode_image` / `encode_text(normalize=...)` serve zero-shot code.
    """

    def __init__(
        self,
        visual: nn.Module,
        text: nn.Module,
        init_logit_scale: float = INIT_LOGIT_SCALE,
        max_logit_scale: float = MAX_LOGIT_SCALE,
    ):
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
        return (
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale.exp(),
        )

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, max_logit_scale], as open_clip does after every step."""
        self.logit_scale.clamp_(0, math.log(self.max_logit_scale))


def build_text_tower(cfg: TextSection, embed_dim: int) -> nn.Module:
    """open_clip's `TextTransformer` projecting to `embed_dim` (random init)."""
    from open_clip.transformer import QuickGELU, TextTransformer  # lazy: open_clip takes seconds to import

    if cfg.width % cfg.heads:
        raise ValueError(f"text width {cfg.width} is not divisible by text heads {cfg.heads}")
    text = TextTransformer(
        context_length=cfg.context_length,
        vocab_size=cfg.vocab_size,
        width=cfg.width,
        heads=cfg.heads,
        layers=cfg.layers,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=embed_dim,
        act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
    )
    text.set_grad_checkpointing(cfg.grad_checkpointing)
    return text


def build_clip(cfg: ClipModelSection, *, release_init: bool = True) -> EvaClip:
    """A randomly initialised EvaClip (vision: EVA's release init, or timm's, which is much faster, when
    `release_init=False` because weights are loaded next; text: open_clip's init)."""
    size = get_size(cfg.vision.size)
    if cfg.vision.img_size:
        size = size_with(size, img_size=cfg.vision.img_size)
    visual = build_encoder(
        size,
        drop_path_rate=cfg.vision.drop_path_rate,
        grad_checkpointing=cfg.vision.grad_checkpointing,
        release_init=release_init,
        num_classes=cfg.embed_dim,  # `head`: CLS token -> embed_dim (EVA_SPEC section 4)
    )
    return EvaClip(
        visual, build_text_tower(cfg.text, cfg.embed_dim), cfg.init_logit_scale, cfg.max_logit_scale
    )


def build_clip_from_config(cfg: ClipModelSection) -> EvaClip:
    """`build_clip`, then the towers' initial weights from `vision.init` / `text.init` when given."""
    model = build_clip(cfg)
    if cfg.vision.init:
        load_vision_init(model.visual, cfg.vision.init)
    else:
        logger.warning(
            "model.vision.init is empty: the vision tower starts from random weights; EVA-CLIP starts "
            "from EVA's MIM weights (set model.vision.init to a `flyeva pretrain` OUTPUT/final folder)"
        )
    if cfg.text.init:
        load_text_init(model.text, cfg.text.init)
    return model


# ---------------------------------------------------------------------------------------------------
# Initial weights.


def _read_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """Encoder-named tensors of a flyeva folder or a release checkpoint (as `load_any` reads them)."""
    folder = path if path.is_dir() else path.parent
    if (folder / FLYEVA_CONFIG).is_file() and (path.is_dir() or path.name == FLYEVA_WEIGHTS):
        return read_checkpoint(folder / FLYEVA_WEIGHTS)
    state, notes = release_to_flyeva(extract_state_dict(read_checkpoint(path)))
    if notes.dropped:
        logger.info("vision init %s: not used from the release file: %s", path, ", ".join(notes.dropped[:8]))
    return state


def load_vision_init(visual: nn.Module, path: str | Path) -> None:
    """Copy a pretrained EVA encoder into the vision tower; only `head` (the CLIP projection) stays fresh.

    Accepts what `flyeva.models.checkpoint.load_any` accepts (a flyeva folder written by `flyeva
    pretrain`, or a release checkpoint). MIM-only weights (`mask_token`, `lm_head`) are dropped with
    a logged note; a position embedding for another grid is resized bicubically.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"vision init {path} does not exist; set model.vision.init to a flyeva folder"
        )
    state = _read_encoder_state(path)
    dropped = sorted(k for k in state if k in MIM_ONLY_KEYS)
    if dropped:
        logger.info(
            "vision init %s: dropped the MIM-only weights %s (a CLIP vision tower has no [MASK] token "
            "or lm_head)",
            path,
            ", ".join(dropped),
        )
    state = {k: v for k, v in state.items() if k not in MIM_ONLY_KEYS}
    expected = visual.pos_embed.shape
    if "pos_embed" in state and state["pos_embed"].shape != expected:
        from timm.layers import resample_abs_pos_embed

        old_grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        new_grid = tuple(visual.patch_embed.grid_size)
        logger.info(
            "vision init %s: position embedding resized from %dx%d to %s", path, old_grid, old_grid, new_grid
        )
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), new_grid, num_prefix_tokens=1)
    load_weights(visual, state, ignore_missing=("head.",))
    logger.info(
        "vision tower: %d tensors from %s; head (CLIP projection) newly initialised", len(state), path
    )


def text_state_from_clip(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The text tower's keys of an open_clip CLIP state dict (top level, or under `text.`)."""
    if any(k.startswith("text.") for k in state):  # open_clip CustomTextCLIP / flyeva EvaClip
        return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    text = {k: v for k, v in state.items() if k.startswith(TEXT_KEY_PREFIXES)}
    if not text:
        raise CheckpointError(
            f"{source} holds no CLIP text tower (expected keys like 'token_embedding.weight' or "
            f"'text.token_embedding.weight'); first keys: {sorted(state)[:5]}"
        )
    return text


def load_text_init(text: nn.Module, path: str | Path) -> None:
    """Copy the text tower of a local open_clip CLIP state dict (e.g. OpenAI CLIP-L's) into `text`.

    `text_projection` is kept only when its shape fits (CLIP-L projects 768 -> 768, EVA-CLIP-g
    needs 768 -> 1024: then it starts fresh, with a logged note); a longer position table is cut to
    the context length. Everything else must match exactly.
    """
    path = Path(path)
    try:
        raw = extract_state_dict(read_checkpoint(path))
    except CheckpointError as error:
        if "TorchScript" not in str(error):
            raise
        raise CheckpointError(
            f"{path} is OpenAI's TorchScript archive, which flyeva does not load (it runs code). Re-save it "
            "once as an open_clip state dict: `m = open_clip.create_model('ViT-L-14-quickgelu', "
            f"pretrained='{path}'); torch.save(m.state_dict(), 'ViT-L-14-openai.pt')`"
        ) from error
    state = text_state_from_clip(raw, str(path))
    expected = text.state_dict()
    fresh = []
    projection = state.get("text_projection")
    if projection is not None and projection.shape != expected["text_projection"].shape:
        fresh.append("text_projection")
        logger.info(
            "text init %s: text_projection %s does not fit %s (embed_dim differs); it starts fresh",
            path,
            tuple(projection.shape),
            tuple(expected["text_projection"].shape),
        )
        del state["text_projection"]
    positions = state.get("positional_embedding")
    if positions is not None and positions.shape[0] > expected["positional_embedding"].shape[0]:
        logger.info(
            "text init %s: position table cut from %d to the context length %d",
            path,
            positions.shape[0],
            expected["positional_embedding"].shape[0],
        )
        state["positional_embedding"] = positions[: expected["positional_embedding"].shape[0]]
    load_weights(text, state, ignore_missing=tuple(fresh))
    logger.info("text tower: %d tensors from %s", len(state), path)


# ---------------------------------------------------------------------------------------------------
# Optimiser groups: one set per tower, each with its own lr, weight decay and layer decay.


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
    """AdamW groups: vision and text towers with their own lr (as lr_scale relative to `lr`), weight
    decay and layer decay, and logit_scale at the base lr without weight decay."""

    def tower(section: VisionSection | TextSection) -> tuple[float, float]:
        tower_lr = lr if section.lr is None else section.lr
        decay = weight_decay if section.weight_decay is None else section.weight_decay
        return tower_lr / lr, decay

    vision_scale, vision_decay = tower(vision)
    text_scale, text_decay = tower(text)
    groups = param_groups(
        model.visual, vision_decay, layer_decay=vision.layer_decay, lr_scale=vision_scale, prefix="visual."
    )
    groups += param_groups(
        model.text,
        text_decay,
        layer_decay=text.layer_decay,
        num_layers=len(model.text.transformer.resblocks),
        layer_id_fn=text_layer_id,
        lr_scale=text_scale,
        prefix="text.",
    )
    if model.logit_scale.requires_grad:
        groups.append(
            {
                "params": [model.logit_scale],
                "param_names": ["logit_scale"],
                "weight_decay": 0.0,
                "lr_scale": 1.0,
                "layer_id": 0,
            }
        )
    return groups


# ---------------------------------------------------------------------------------------------------
# Saving and loading a trained EvaClip.


def arch_dict(cfg: ClipModelSection) -> dict[str, Any]:
    """What rebuilds the architecture (init paths and optimiser settings left out)."""
    vision = {k: getattr(cfg.vision, k) for k in ("size", "img_size")}
    text = {
        k: getattr(cfg.text, k)
        for k in ("width", "heads", "layers", "context_length", "vocab_size", "mlp_ratio", "quick_gelu")
    }
    return {
        "embed_dim": cfg.embed_dim,
        "vision": vision,
        "text": text,
        "max_logit_scale": cfg.max_logit_scale,
    }


def section_from_arch(arch: dict[str, Any]) -> ClipModelSection:
    return ClipModelSection(
        embed_dim=arch["embed_dim"],
        vision=VisionSection(**arch["vision"]),
        text=TextSection(**arch["text"]),
        max_logit_scale=arch.get("max_logit_scale", MAX_LOGIT_SCALE),
    )


def save_clip(model: EvaClip, cfg: ClipModelSection, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write `clip.safetensors` + `clip.json` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / CLIP_WEIGHTS))
    config = {"format": CLIP_FORMAT, "arch": arch_dict(cfg), **(extra or {})}
    (out_dir / CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    return out_dir


def load_clip(path: str | Path) -> tuple[EvaClip, ClipModelSection]:
    """Load a folder written by `save_clip` (e.g. `flyeva clip train`'s OUTPUT/final)."""
    folder = Path(path)
    if not (folder / CLIP_CONFIG).is_file():
        raise CheckpointError(
            f"{folder} has no {CLIP_CONFIG}; pass the folder `flyeva clip train` wrote (OUTPUT/final)"
        )
    config = json.loads((folder / CLIP_CONFIG).read_text())
    if config.get("format") != CLIP_FORMAT:
        raise CheckpointError(
            f"{folder / CLIP_CONFIG} is not a flyeva CLIP config (format {config.get('format')!r})"
        )
    cfg = section_from_arch(config["arch"])
    model = build_clip(cfg, release_init=False)
    load_weights(model, load_file(str(folder / CLIP_WEIGHTS)))
    return model, cfg


def vision_encoder_state(model: EvaClip) -> dict[str, torch.Tensor]:
    """The vision tower without its CLIP head: loads into `build_encoder` (for linear probes)."""
    return {k: v for k, v in model.visual.state_dict().items() if not k.startswith("head.")}
