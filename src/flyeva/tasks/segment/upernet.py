"""EVA + UperNet: the light semantic-segmentation recipe (BEiT and EVA-02 mmseg configs).

The heads are transformers' ports of mmseg's `UPerHead` (PPM 1, 2, 3, 6 + FPN) and `FCNHead` (one 3x3
conv on level 2, loss weight 0.4); not `UperNetForSemanticSegmentation`, which builds its own backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import UperNetConfig
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from flyeva.tasks.segment.backbone import EvaBackbone, EvaSegmenter

IGNORE_INDEX = 255


@dataclass
class UperNetSection:
    """UperNet head sizes; defaults are EVA-L/g's (1024 channels, docs/segment.md)."""

    channels: int = 1024  # 768 for eva_base (BEiT's config)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    aux_channels: int = 256
    aux_weight: float = 0.4  # mmseg FCNHead loss_weight


class EvaUperNet(EvaSegmenter):
    """EVA backbone + neck + UperNet head + FCN auxiliary head: `forward(images)` gives per-class logits at
    the input resolution, `forward(images, labels)` (loss, metrics): cross-entropy, ignore 255, both heads."""

    decoder = "upernet"
    scores_are_probabilities = False  # logits: multi-scale averaging applies softmax first

    def __init__(self, backbone: EvaBackbone, num_classes: int, cfg: UperNetSection) -> None:
        super().__init__(backbone, num_classes, cfg)
        head_config = UperNetConfig(
            num_labels=num_classes,
            hidden_size=cfg.channels,
            pool_scales=list(cfg.pool_scales),
            auxiliary_channels=cfg.aux_channels,
            auxiliary_num_convs=1,
            auxiliary_concat_input=False,
            backbone_config={"model_type": "resnet"},  # never built; only the head reads this config
        )
        self.decode_head = UperNetHead(head_config, in_channels=backbone.channels)
        self.auxiliary_head = UperNetFCNHead(head_config, in_channels=backbone.channels, in_index=2)
        for classifier in (self.decode_head.classifier, self.auxiliary_head.classifier):
            nn.init.normal_(classifier.weight, std=0.01)  # mmseg BaseDecodeHead.init_weights
            nn.init.zeros_(classifier.bias)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if labels is not None and len(images) == 0:
            return loss_of_no_images(self, images, labels)
        if self.training and len(images) == 1:
            return loss_of_one_image(self, images, labels)
        features = self.backbone(images)
        logits = upsample(self.decode_head(features), images.shape[-2:])
        if labels is None:
            return logits
        aux_logits = upsample(self.auxiliary_head(features), images.shape[-2:])
        decode_loss = pixel_cross_entropy(logits, labels)
        aux_loss = pixel_cross_entropy(aux_logits, labels)
        loss = decode_loss + self.cfg.aux_weight * aux_loss
        return loss, {"loss_decode": decode_loss.detach(), "loss_aux": aux_loss.detach()}


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every pixel, ignored ones counting 0, as the release's mmseg 0.x
    (`avg_non_ignore` did not exist yet): an image whose pixels are all ignored gives 0, not NaN."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()


def loss_of_no_images(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A rank whose batch was all unreadable forwards two blank, all-ignored images at weight 0: its
    gradients are zero, yet it joins every collective of the step (DDP, SyncBN, Mask2Former's mask count).
    Two, because BatchNorm refuses one value per channel; momentum 0 keeps its running statistics."""
    blank = images.new_zeros(2, *images.shape[1:])
    ignored = labels.new_full((2, *labels.shape[1:]), IGNORE_INDEX)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        loss, metrics = model(blank, ignored)
        for norm in norms:
            if norm.num_batches_tracked is not None:
                norm.num_batches_tracked -= 1  # the blank batch was not a batch
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
    return loss * 0.0, {name: value * 0.0 for name, value in metrics.items()}


def loss_of_one_image(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One image (batch 1 per GPU, or one readable sample): BatchNorm refuses one value per channel in
    the pooling module's 1x1 maps, so the image is paired with a copy whose pixels are all ignored.
    The pair's batch statistics are the image's own, and the loss (a mean over every pixel) is doubled
    back to the image's."""
    pair = torch.cat([images, images])
    if labels is None:
        return model(pair)[:1]
    loss, metrics = model(pair, torch.cat([labels, torch.full_like(labels, IGNORE_INDEX)]))
    return loss * 2, {name: value * 2 for name, value in metrics.items()}


def upsample(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """Bilinear resize of [B, C, h, w] maps to `size`, as mmseg's `resize`."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
