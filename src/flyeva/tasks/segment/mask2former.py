"""EVA + Mask2Former: the paper's segmentation decoder (section 4.2; release `EVA-01/seg`).

The parts are transformers' Mask2Former (6-layer deformable-attention pixel decoder over the
three coarsest levels, masked-attention transformer decoder, Hungarian matcher and losses with
the release's weights: class 2 with no-object 0.1, mask BCE 5, dice 5, 12,544 points with
oversample 3 and importance 0.75), assembled here around the EVA backbone + neck instead of
`Mask2FormerForUniversalSegmentation`, whose constructor builds its own backbone from a config.
The paper's ViT-Adapter between encoder and decoder is not built (docs/segment.md).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
)

from flyeva.tasks.segment.backbone import EvaBackbone, EvaSegmenter
from flyeva.tasks.segment.mask2former_config import Mask2FormerSection
from flyeva.tasks.segment.upernet import IGNORE_INDEX, loss_of_no_images, upsample


def transformers_config(cfg: Mask2FormerSection, num_classes: int) -> Mask2FormerConfig:
    # The section's other fields (queries, widths, loss weights, point sampling) are transformers' names.
    alike = {
        k: v for k, v in asdict(cfg).items() if k not in ("num_heads", "dim_feedforward", "decoder_layers")
    }
    return Mask2FormerConfig(
        num_labels=num_classes,
        feature_size=cfg.hidden_dim,
        mask_feature_size=cfg.hidden_dim,
        num_attention_heads=cfg.num_heads,
        dim_feedforward=cfg.dim_feedforward,
        encoder_feedforward_dim=cfg.dim_feedforward,
        decoder_layers=cfg.decoder_layers + 1,
        feature_strides=[4, 8, 16, 32],  # only their ratios matter: the neck's levels are 2x apart
        ignore_value=IGNORE_INDEX,
        **alike,
    )


class DistributedMask2FormerLoss(Mask2FormerLoss):
    """transformers' loss, with the target-mask count averaged over ranks by torch.distributed (as the
    original Mask2Former does); transformers only does this under accelerate."""

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        num_masks = torch.tensor(float(sum(len(c) for c in class_labels)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        return num_masks.clamp(min=1)


class Mask2FormerDecodeHead(Mask2FormerPreTrainedModel):
    """Pixel decoder + transformer decoder + class predictor + loss, initialised as transformers does."""

    def __init__(self, config: Mask2FormerConfig, in_channels: list[int]) -> None:
        super().__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=in_channels)
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight}
        self.weight_dict = weights | {"loss_dice": config.dice_weight}
        self.criterion = DistributedMask2FormerLoss(config=config, weight_dict=self.weight_dict)
        self.post_init()

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per decoder layer: class logits [B, Q, C + 1] and mask logits [B, Q, H/4, W/4]."""
        pixels = self.pixel_decoder(features, output_hidden_states=False)
        decoded = self.transformer_module(
            multi_scale_features=pixels.multi_scale_features,
            mask_features=pixels.mask_features,
            output_hidden_states=True,
        )
        class_logits = [self.class_predictor(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]
        return class_logits, list(decoded.masks_queries_logits)


def semantic_targets(labels: torch.Tensor, num_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: one binary mask per class present (ignore 255 belongs to none) and its class index."""
    masks, classes = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[(present != IGNORE_INDEX) & (present < num_classes)]
        masks.append((label[None] == present[:, None, None]).float())
        classes.append(present.long())
    return masks, classes


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's semantic inference: softmax classes (no-object dropped) x sigmoid masks, summed
    over queries: [B, Q, C + 1], [B, Q, H, W] -> [B, C, H, W]."""
    probabilities = class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probabilities, mask_logits.float().sigmoid())


class EvaMask2Former(EvaSegmenter):
    """EVA backbone + neck + Mask2Former; `forward(images)` gives semantic scores at input resolution,
    `forward(images, labels)` gives (loss, metrics) summed over every decoder layer's predictions."""

    decoder = "mask2former"
    scores_are_probabilities = True

    def __init__(self, backbone: EvaBackbone, num_classes: int, cfg: Mask2FormerSection) -> None:
        if cfg.hidden_dim % 32 or cfg.hidden_dim % cfg.num_heads:
            raise ValueError(
                f"mask2former.hidden_dim={cfg.hidden_dim} must be a multiple of 32 (GroupNorm groups) "
                f"and of num_heads={cfg.num_heads}"
            )
        super().__init__(backbone, num_classes, cfg)
        self.decode_head = Mask2FormerDecodeHead(transformers_config(cfg, num_classes), backbone.channels)

    def no_weight_decay(self) -> set[str]:
        # Query and level embeddings carry no weight decay (the Mask2Former configs' decay_mult 0).
        embeddings = {
            name
            for name, _ in self.named_parameters()
            if name.startswith("decode_head.")
            and any(part in name for part in ("queries_embedder", "queries_features", "level_embed"))
        }
        return super().no_weight_decay() | embeddings

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if labels is not None and len(images) == 0:
            return loss_of_no_images(self, images, labels)
        class_logits, mask_logits = self.decode_head(self.backbone(images))
        if labels is None:
            return semantic_scores(class_logits[-1], upsample(mask_logits[-1], images.shape[-2:]))
        target_masks, target_classes = semantic_targets(labels, self.num_classes)
        auxiliary = [
            {"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
            for m, c in zip(mask_logits[:-1], class_logits[:-1])
        ]
        head = self.decode_head
        losses = head.criterion(
            masks_queries_logits=mask_logits[-1].float(),
            class_queries_logits=class_logits[-1].float(),
            mask_labels=target_masks,
            class_labels=target_classes,
            auxiliary_predictions=auxiliary,
        )
        weighted = {
            key: value * next(w for name, w in head.weight_dict.items() if key.startswith(name))
            for key, value in losses.items()
        }
        metrics = {name: weighted[name].detach() for name in head.weight_dict}  # the last layer's terms
        return sum(weighted.values()), metrics
