"""The EVA encoder as a dense backbone: block outputs at `out_indices` -> a 4-level feature pyramid.

The neck is BEiT's and EVA-02's mmseg backbone head (paper section 4.2, release `EVA-01/seg` for
the crop and the patch-16 resize): from the stride-16 token map, two stride-2 deconvolutions with
BatchNorm + GELU between them (stride 4), one deconvolution (stride 8), the map itself (stride 16)
and a 2x2 max-pool (stride 32). Strides are relative to the input for patch 16; with patch p they
are p/4, p/2, p, 2p.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from timm.models.eva import Eva
from torch import nn

from flyeva.engine.optim import layer_id_for_vit
from flyeva.models.eva import EvaSize, eva_kwargs, resize_patch_embed, set_image_size

ENCODER_PREFIX = "backbone.encoder."


class BackboneLayers:
    """Layer ids of a segmenter for layer decay (`engine.optim.layer_decay_groups`): encoder embeddings
    0, block i -> i + 1; the neck and the whole decoder num_layers + 1 (full lr).

    The release's builder puts Mask2Former's query and level embeddings at layer 0 (lr x 0.95^41);
    here every decoder parameter gets the full lr (docs/segment.md).
    """

    backbone: EvaBackbone

    @property
    def num_layers(self) -> int:
        return self.backbone.num_layers

    @staticmethod
    def layer_id(name: str, num_layers: int) -> int:
        if name.startswith(ENCODER_PREFIX):
            return layer_id_for_vit(name.removeprefix(ENCODER_PREFIX), num_layers)
        return num_layers + 1


class FeaturePyramidNeck(nn.Module):
    """Token map at stride p -> maps at strides p/4, p/2, p, 2p, all with the encoder's width."""

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


def dense_encoder(size: EvaSize, drop_path_rate: float = 0.0) -> Eva:
    """A timm `Eva` that accepts any input size: position embeddings are resampled to each grid.

    The final norm is unused by dense tasks (features are raw block outputs, as in BEiT's mmseg
    backbone); it is replaced by Identity so DDP sees no parameter without a gradient.
    """
    encoder = Eva(**eva_kwargs(size, drop_path_rate=drop_path_rate, dynamic_img_size=True))
    encoder.norm = nn.Identity()
    return encoder


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
        self.encoder = dense_encoder(size, drop_path_rate)
        self.encoder.set_grad_checkpointing(grad_checkpointing)
        self.neck = FeaturePyramidNeck(size.embed_dim)
        self.channels = [size.embed_dim] * 4

    @property
    def num_layers(self) -> int:
        return len(self.encoder.blocks)

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

    def arch(self) -> dict[str, Any]:
        return {"size": asdict(self.size), "out_indices": self.out_indices}


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
    from flyeva.models.weights import is_weights_folder, read_config

    if not path or not is_weights_folder(path):
        return
    kind = read_config(path)["kind"]
    if kind in NOT_IMAGE_ENCODERS:
        raise ValueError(
            f"model.init={path} holds a {kind} model ({NOT_IMAGE_ENCODERS[kind]}); a segmenter starts from "
            "image encoder weights: pass model.init=<the `flyeva pretrain` OUTPUT/final (MIM), an encoder or "
            "classifier folder, or a release EVA image checkpoint>"
        )


def _read_encoder(path: str) -> Eva:
    """A timm `Eva` from a flyeva weights folder (any kind holding an encoder) or a release checkpoint."""
    from flyeva.models.checkpoint import load_any
    from flyeva.models.weights import is_weights_folder, load, read_config

    check_init_kind(path)
    if is_weights_folder(path) and "arch" in read_config(path):
        return load(path, kind="encoder")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"model.init={path} does not exist; give a flyeva weights folder or a release file"
        )
    return load_any(path, kind="encoder")


def load_pretrained_encoder(path: str, patch_size: int, crop: int) -> tuple[EvaSize, dict[str, torch.Tensor]]:
    """A pretrained encoder's size and weights for a dense backbone at `crop` px and `patch_size`.

    The patch kernel is resized (14 -> 16) and the position table resized to the crop's grid, both
    bicubic, as the release does (`EVA-01/seg`). Reads a flyeva folder or a release checkpoint.
    """
    pretrained = _read_encoder(path)
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
