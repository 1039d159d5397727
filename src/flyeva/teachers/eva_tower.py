"""A flyeva EVA-CLIP's vision tower as MIM teacher (the miniature world trains its own CLIP); target = its
projection head on the final-norm patch tokens, like OpenAI CLIP's `ln_post` + `proj` (docs/recipes.md §3)."""

from __future__ import annotations

import json
from pathlib import Path

from timm.models.eva import Eva
from torch import Tensor

from flyeva.models.checkpoint import load_weights, read_checkpoint
from flyeva.models.eva import EvaSize, build_encoder, get_size, size_with
from flyeva.models.weights import CONFIG_FILE, WEIGHTS_FILE, WeightsError, read_config
from flyeva.teachers.frozen import FrozenTeacher

# The two-file CLIP layout (weights format 1); other folders are weights folders of kind "clip".
LEGACY_CLIP_CONFIG, LEGACY_CLIP_WEIGHTS = "clip.json", "clip.safetensors"


class EvaTowerTeacher(FrozenTeacher):
    """Frozen EVA vision tower with a projection `head`; `forward` gives [B, num_patches, embed_dim]."""

    def __init__(self, visual: Eva, name: str):
        super().__init__()
        self.visual = visual
        self.name = name
        self.grid_size: tuple[int, int] = tuple(visual.patch_embed.grid_size)
        self.patch_size: int = visual.patch_embed.patch_size[0]
        self.image_size: int = visual.patch_embed.img_size[0]
        self.embed_dim: int = visual.head.out_features
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]
        self.freeze()

    def patch_targets(self, images: Tensor) -> Tensor:
        tokens = self.visual.forward_features(images)[:, self.visual.num_prefix_tokens :]
        return self.visual.head(tokens)


def is_eva_clip_folder(path: str | Path) -> bool:
    """A folder `flyeva clip train` or `flyeva clip convert` wrote (either layout)."""
    folder = Path(path)
    if (folder / LEGACY_CLIP_CONFIG).is_file():
        return True
    if not (folder / CONFIG_FILE).is_file():
        return False
    try:
        return read_config(folder)["kind"] == "clip"
    except WeightsError:  # unreadable, or not a flyeva config (e.g. a Hugging Face CLIP folder)
        return False


def _clip_arch_and_weights(folder: Path) -> tuple[dict, Path]:
    if (folder / LEGACY_CLIP_CONFIG).is_file():
        return json.loads((folder / LEGACY_CLIP_CONFIG).read_text())["arch"], folder / LEGACY_CLIP_WEIGHTS
    config = read_config(folder)
    if config["kind"] != "clip":
        raise ValueError(
            f"{folder} holds a flyeva {config['kind']!r} model, not an EVA-CLIP; pass a CLIP folder"
        )
    return config["arch"], folder / WEIGHTS_FILE


def load_eva_clip_teacher(folder: str | Path) -> EvaTowerTeacher:
    """The vision tower of a flyeva EVA-CLIP folder (`flyeva clip train`'s OUTPUT/final)."""
    folder = Path(folder)
    arch, weights = _clip_arch_and_weights(folder)
    vision = arch["vision"]
    size = EvaSize(**vision["size"]) if isinstance(vision["size"], dict) else get_size(vision["size"])
    if vision.get("img_size"):
        size = size_with(size, img_size=vision["img_size"])
    visual = build_encoder(size, num_classes=arch["embed_dim"], release_init=False)
    state = read_checkpoint(weights)
    load_weights(visual, {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
    return EvaTowerTeacher(visual, name=f"flyeva-clip:{folder.name}")
