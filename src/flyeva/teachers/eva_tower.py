"""A flyeva EVA-CLIP's vision tower as MIM teacher (the miniature world trains its own CLIP).

Target = the tower's projection head on its final-norm patch tokens, the analogue of OpenAI
CLIP's `ln_post` + `proj` (EVA_SPEC section 3).
"""

from __future__ import annotations

import json
from pathlib import Path

from timm.models.eva import Eva
from torch import Tensor

from flyeva.models.checkpoint import load_weights, read_checkpoint
from flyeva.models.eva import build_encoder, get_size, size_with
from flyeva.teachers.frozen import FrozenTeacher

# The folder `flyeva clip train` writes (flyeva.tasks.clip.model.save_clip).
CLIP_CONFIG, CLIP_WEIGHTS = "clip.json", "clip.safetensors"


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


def load_eva_clip_teacher(folder: str | Path) -> EvaTowerTeacher:
    """The vision tower of a folder written by `flyeva clip train` (OUTPUT/final)."""
    folder = Path(folder)
    arch = json.loads((folder / CLIP_CONFIG).read_text())["arch"]
    size = get_size(arch["vision"]["size"])
    if arch["vision"].get("img_size"):
        size = size_with(size, img_size=arch["vision"]["img_size"])
    visual = build_encoder(size, num_classes=arch["embed_dim"], release_init=False)
    state = read_checkpoint(folder / CLIP_WEIGHTS)
    load_weights(visual, {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")})
    return EvaTowerTeacher(visual, name=f"flyeva-clip:{folder.name}")
