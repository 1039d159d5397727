"""The EVA Cascade Mask R-CNN: ViTDet backbone + torchvision RPN + cascade/mask heads, and its builders.

`detector(images)` takes 0-255 RGB images (a [B, 3, H, W] tensor or a list of [3, h, w]) and, in
eval mode, returns one dict per image: `boxes` [n, 4] xyxy, `labels` [n] (0-based class index),
`scores` [n] and `masks` [n, H, W] bool. The architecture is a json-able `arch` dict, so a trained
detector saves as a flyeva weights folder of kind `detector` (`build_from_arch` rebuilds it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from flyeva.tasks.detect.backbone import EvaViTDet, SimpleFeaturePyramid
from flyeva.tasks.detect.cascade import CascadeRoIHeads, RoIHeadsConfig

# ImageNet statistics on the 0-255 scale (release `EVA-01/det`; pretraining used CLIP's: docs/recipes.md §9)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def default_arch(num_classes: int = 80) -> dict[str, Any]:
    """The release's EVA-g COCO model at 1280 px (release `EVA-01/det`), with the heads' defaults."""
    from flyeva.tasks.detect.config import DetectConfig, arch_from_config

    # pos_grid 14: the release's 224 / 16 table (+ CLS), resized to the grid every forward
    dims = {"embed_dim": 1408, "depth": 40, "num_heads": 16, "mlp_dim": 6144, "pos_grid": 14}
    return dict(
        arch_from_config(DetectConfig(), dims, num_classes), roi_heads=vars(RoIHeadsConfig(num_classes))
    )


class EvaDetector(nn.Module):
    """Cascade Mask R-CNN on a ViTDet-adapted EVA (paper section 4.3; release `EVA-01/det`)."""

    def __init__(self, arch: dict[str, Any], fed_weights: torch.Tensor | None = None):
        super().__init__()
        self.arch = copy.deepcopy(arch)
        b, r = arch["backbone"], arch["rpn"]
        net = EvaViTDet(
            b["img_size"], b["patch_size"], b["embed_dim"], b["depth"], b["num_heads"], b["mlp_dim"],
            b["pos_grid"], b["window"], b["global_blocks"],
        )  # fmt: skip
        self.backbone = SimpleFeaturePyramid(net, b["out_channels"], tuple(b["pyramid_scales"]))
        levels = len(self.backbone.strides)
        if len(r["anchor_sizes"]) != levels:
            raise ValueError(
                f"rpn.anchor_sizes needs one size per pyramid level ({levels}), got {r['anchor_sizes']}"
            )
        anchors = AnchorGenerator(
            tuple((s,) for s in r["anchor_sizes"]), (tuple(r["aspect_ratios"]),) * levels
        )
        self.proposal_generator = RegionProposalNetwork(
            anchors,
            RPNHead(b["out_channels"], len(r["aspect_ratios"]), conv_depth=2),
            fg_iou_thresh=0.7,
            bg_iou_thresh=0.3,
            batch_size_per_image=r["batch_size_per_image"],
            positive_fraction=0.5,
            pre_nms_top_n={"training": r["pre_nms_train"], "testing": r["pre_nms_test"]},
            post_nms_top_n={"training": r["post_nms_train"], "testing": r["post_nms_test"]},
            nms_thresh=r["nms"],
        )
        heads = RoIHeadsConfig(**arch["roi_heads"])
        heads.strides = self.backbone.strides[:-1]  # the RoI pooler skips P6, as detectron2
        heads.channels = b["out_channels"]
        self.roi_heads = CascadeRoIHeads(heads, fed_weights)
        self.square_size = arch.get("square_size", 0)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(3, 1, 1), persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self.backbone.net.blocks)

    @staticmethod
    def layer_id(name: str, num_layers: int) -> int:
        """The release's `get_vit_lr_decay_rate`: embeddings 0, block i -> i + 1, pyramid and heads L + 1."""
        if name.startswith("backbone.net."):
            if ".pos_embed" in name or ".patch_embed" in name or name.endswith("pos_embed"):
                return 0
            if ".blocks." in name:
                return int(name.split(".blocks.")[1].split(".")[0]) + 1
        return num_layers + 1

    def preprocess(self, images: torch.Tensor | list[torch.Tensor], sizes=None) -> ImageList:
        """Normalise (ImageNet, 0-255), zero-pad bottom/right to `square_size` (or the largest image)."""
        images = list(images) if isinstance(images, (list, tuple)) else list(images.unbind(0))
        sizes = (
            [tuple(int(v) for v in s) for s in sizes] if sizes is not None else [i.shape[-2:] for i in images]
        )
        stride = self.backbone.strides[-1]
        side = self.square_size or max(max(s) for s in sizes)
        side = -(-max(side, *(max(i.shape[-2:]) for i in images)) // stride) * stride
        batch = images[0].new_zeros(len(images), 3, side, side, dtype=torch.float32)
        for slot, (image, (height, width)) in enumerate(zip(images, sizes)):
            normalized = (image[:, :height, :width].float() - self.pixel_mean) / self.pixel_std
            batch[slot, :, :height, :width] = normalized
        return ImageList(batch, [(int(h), int(w)) for h, w in sizes])

    def forward(
        self,
        images: torch.Tensor | list[torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
        image_sizes: list[tuple[int, int]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Training (with `targets`): the loss dict. Eval: detections, rescaled to `original_sizes`."""
        image_list = self.preprocess(images, image_sizes)
        features = self.backbone(image_list.tensors.to(self.pixel_mean.device))
        pooled = list(features.values())[:-1]
        if self.training:
            if targets is None:
                raise ValueError("training needs targets (boxes, labels, masks per image)")
            proposals, losses = self.proposal_generator(image_list, features, targets)
            losses.update(self.roi_heads(pooled, proposals, image_list.image_sizes, targets))
            return losses
        proposals, _ = self.proposal_generator(image_list, features)
        detections = self.roi_heads(pooled, proposals, image_list.image_sizes)
        return self.postprocess(detections, image_list.image_sizes, original_sizes or image_list.image_sizes)

    @staticmethod
    def postprocess(detections, image_sizes, original_sizes) -> list[dict[str, torch.Tensor]]:
        """Boxes scaled from the network's input size to the original size; 28x28 masks pasted there."""
        out = []
        for det, (height, width), (orig_h, orig_w) in zip(detections, image_sizes, original_sizes):
            scale = torch.tensor([orig_w / width, orig_h / height] * 2, device=det["boxes"].device)
            boxes = det["boxes"] * scale
            result = {"boxes": boxes, "scores": det["scores"], "labels": det["labels"]}
            if "mask_probs" in det:
                pasted = paste_masks_in_image(det["mask_probs"][:, None], boxes, (orig_h, orig_w), padding=1)
                result["masks"] = pasted[:, 0] >= 0.5
            out.append(result)
        return out


def build_from_arch(arch: dict[str, Any]) -> EvaDetector:
    """The weights-format builder of kind `detector`: the architecture only, no weights loaded."""
    return EvaDetector(arch)


def set_training_options(
    detector: EvaDetector, drop_path_rate: float, grad_checkpointing: bool, freeze_patch_embed: bool
) -> None:
    """Drop path (linear over depth), activation checkpointing, frozen patch embedding (the release's)."""
    from timm.layers import DropPath

    net = detector.backbone.net
    depth = len(net.blocks)
    for index, block in enumerate(net.blocks):
        rate = drop_path_rate * index / max(1, depth - 1)
        block.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    net.grad_checkpointing = grad_checkpointing
    for param in net.patch_embed.parameters():
        param.requires_grad_(not freeze_patch_embed)


@torch.no_grad()
def backbone_from_encoder(
    encoder: nn.Module,
    *,
    patch_size: int = 16,
    img_size: int = 1024,
    window: int = 16,
    pos_grid: int | None = None,
    global_blocks: list[int] | None = None,
) -> EvaViTDet:
    """A ViTDet backbone holding a timm `Eva` encoder's weights (rel-pos tables zero, CLS and norm dropped).

    The patch kernel is resized to `patch_size` by the project's bicubic kernel resize, which also
    resamples the position table to the new grid of the encoder's pretraining size (224 / 16 = 14
    for EVA-g, as the release); a different `pos_grid` resizes it bicubically once more.
    """
    from flyeva.models.eva import resize_patch_embed

    encoder = copy.deepcopy(encoder)
    if encoder.patch_embed.patch_size[0] != patch_size:
        resize_patch_embed(encoder, patch_size)
    grid = encoder.patch_embed.grid_size[0]
    pos_grid = pos_grid or grid
    blocks = encoder.blocks
    net = EvaViTDet(
        img_size, patch_size, encoder.embed_dim, len(blocks), blocks[0].attn.num_heads,
        blocks[0].mlp.fc1.out_features, pos_grid, window, global_blocks,
    )  # fmt: skip
    table = encoder.pos_embed[:, -grid * grid :]
    if pos_grid != grid:
        table = table.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, (pos_grid, pos_grid), mode="bicubic").flatten(2).transpose(1, 2)
    net.pos_embed.copy_(torch.cat([net.pos_embed[:, :1], table], dim=1))
    state = {k: v for k, v in encoder.state_dict().items() if k.startswith(("blocks.", "patch_embed."))}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("rel_pos_h", "rel_pos_w")) and k != "pos_embed"]
    if missing or unexpected:
        raise ValueError(
            f"encoder weights do not fit the detection backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return net
