"""The EVA encoder as a dense backbone: block outputs at `out_indices` -> a 4-level feature pyramid.

The neck is BEiT's and EVA-02's mmseg backbone head (paper section 4.2, release `EVA-01/seg` for
the crop and the patch-16 resize). Strides are relative to the input for patch 16; with patch p
they are p/4, p/2, p, 2p.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.models.eva import Eva
from torch import nn

from flyeva.engine.optim import layer_id_for_vit
from flyeva.models.checkpoint import load_any
from flyeva.models.eva import EvaSize, eva_kwargs, resize_patch_embed, set_image_size
from flyeva.models.weights import is_weights_folder, load, read_config

ENCODER_PREFIX = "backbone.encoder."


class EvaSegmenter(nn.Module):
    """A segmenter's shared parts: backbone, class count, decoder section, and the layer ids for layer
    decay (`engine.optim.layer_decay_groups`): encoder embeddings 0, block i -> i + 1, the neck and
    the whole decoder num_layers + 1 (full lr; the release puts Mask2Former's query and level
    embeddings at layer 0, docs/segment.md)."""

    decoder = ""  # the `arch` name of the subclass's decoder, also its section's key

    def __init__(self, backbone: EvaBackbone, num_classes: int, cfg: Any) -> None:
        super().__init__()
        self.num_classes, self.cfg, self.backbone = num_classes, cfg, backbone

    @property
    def num_layers(self) -> int:
        return len(self.backbone.encoder.blocks)

    @staticmethod
    def layer_id(name: str, num_layers: int) -> int:
        if name.startswith(ENCODER_PREFIX):
            return layer_id_for_vit(name.removeprefix(ENCODER_PREFIX), num_layers)
        return num_layers + 1

    def no_weight_decay(self) -> set[str]:
        return {f"{ENCODER_PREFIX}{name}" for name in self.backbone.encoder.no_weight_decay()}

    def arch(self) -> dict[str, Any]:
        """The `arch` of a `segmenter` weights folder (see flyeva.models.weights)."""
        arch = {"encoder": asdict(self.backbone.size), "out_indices": self.backbone.out_indices}
        return arch | {
            "num_classes": self.num_classes,
            "decoder": self.decoder,
            self.decoder: asdict(self.cfg),
        }


class FeaturePyramidNeck(nn.Module):
    """Token map at stride p -> maps at strides p/4 (two stride-2 deconvolutions, BatchNorm + GELU
    between), p/2 (one deconvolution), p (the map) and 2p (2x2 max-pool), all of the encoder's width."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)
        self.down2 = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(maps) != 4:
            raise ValueError(f"the neck takes 4 block outputs (out_indices), got {len(maps)}")
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]


class EvaBackbone(nn.Module):
    """EVA encoder + neck: `forward(images)` returns the 4 pyramid levels, finest first."""

    def __init__(
        self,
        size: EvaSize,
        out_indices: list[int],
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if len(out_indices) != 4 or not all(0 <= i < size.depth for i in out_indices):
            raise ValueError(
                f"out_indices must be 4 block indices in [0, {size.depth}), got {out_indices}; "
                "e.g. [3, 5, 7, 11] for a 12-block encoder"
            )
        self.size = size
        self.out_indices = list(out_indices)
        self.encoder = Eva(**eva_kwargs(size, drop_path_rate=drop_path_rate, dynamic_img_size=True))
        self.encoder.norm = nn.Identity()  # dense features are raw block outputs; DDP wants no unused weight
        self.encoder.set_grad_checkpointing(grad_checkpointing)
        self.neck = FeaturePyramidNeck(size.embed_dim)
        self.channels = [size.embed_dim] * 4

    @property
    def size_divisor(self) -> int:
        """Inputs must be a multiple of this (patch x 2, so the max-pooled level is exact)."""
        return 2 * self.size.patch_size

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        taken = sorted(set(self.out_indices))  # timm returns each block once, in order
        maps = self.encoder.forward_intermediates(
            images, indices=taken, norm=False, output_fmt="NCHW", intermediates_only=True
        )
        by_block = dict(zip(taken, maps))
        return self.neck([by_block[index] for index in self.out_indices])


# Weights kinds that hold no image encoder a segmenter could start from, and what they are instead
# (a segmenter folder is a start of its own: `model.build_segmenter`).
NOT_IMAGE_ENCODERS = {
    "video": "its patch kernel and position table are spatio-temporal; pass the image encoder it was "
    "inflated from (the video run's model.init) instead",
    "detector": "a ViTDet backbone with rel-pos tables and a feature pyramid",
    "probe": "a linear head over a frozen encoder; pass that encoder's folder instead",
}


def check_init_kind(path: str) -> None:
    """ValueError (before any work) when `path` is a flyeva folder of a kind that holds no image encoder."""
    if not path or not is_weights_folder(path):
        return
    kind = read_config(path)["kind"]
    if kind in NOT_IMAGE_ENCODERS:
        raise ValueError(
            f"model.init={path} holds a {kind} model ({NOT_IMAGE_ENCODERS[kind]}); a segmenter starts from "
            "image encoder weights: pass model.init=<the `flyeva pretrain` OUTPUT/final (MIM), an encoder or "
            "classifier folder, or a release EVA image checkpoint>"
        )


def load_pretrained_encoder(path: str, patch_size: int, crop: int) -> tuple[EvaSize, dict[str, torch.Tensor]]:
    """A pretrained encoder's (flyeva folder or release checkpoint) size and weights for a dense backbone at
    `crop` px: patch kernel (14 -> 16) and position table resized bicubically (`EVA-01/seg`)."""
    check_init_kind(path)
    if is_weights_folder(path) and "arch" in read_config(path):
        pretrained = load(path, kind="encoder")
    elif not Path(path).exists():
        raise FileNotFoundError(
            f"model.init={path} does not exist; give a flyeva weights folder or a release file"
        )
    else:
        pretrained = load_any(path, kind="encoder")
    if pretrained.patch_embed.patch_size[0] != patch_size:
        resize_patch_embed(pretrained, patch_size, img_size=crop)
    elif pretrained.patch_embed.img_size[0] != crop:
        set_image_size(pretrained, crop)
    size = EvaSize(
        img_size=crop,
        patch_size=patch_size,
        embed_dim=pretrained.embed_dim,
        depth=len(pretrained.blocks),
        num_heads=pretrained.blocks[0].attn.num_heads,
        mlp_dim=pretrained.blocks[0].mlp.fc1.out_features,
    )
    unused = ("norm.", "fc_norm.", "head.")  # dense features are raw block outputs
    return size, {k: v for k, v in pretrained.state_dict().items() if not k.startswith(unused)}
