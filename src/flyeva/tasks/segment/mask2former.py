"""EVA + Mask2Former: the paper's segmentation decoder (section 4.2; release `EVA-01/seg`).

The parts are transformers' Mask2Former (6-layer deformable-attention pixel decoder over the
three coarsest levels, masked-attention transformer decoder, Hungarian matcher and losses with
the release's weights: class 2 with no-object 0.1, mask BCE 5, dice 5, 12,544 points with
oversample 3 and importance 0.75), assembled here around the EVA backbone + neck instead of
`Mask2FormerForUniversalSegmentation`, whose constructor builds its own backbone from a config.
The matcher and the mask loss read their target points from the label map (`sample_label_masks`)
instead of grid-sampling full-resolution binary masks, and the pixel decoder's deformable attention
weights one level at a time: the same numbers (tests/test_segment_model.py), less time outside matmuls.
The paper's ViT-Adapter between encoder and decoder is not built (docs/segment.md).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import nn
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerHungarianMatcher,
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    Mask2FormerPreTrainedModel,
    Mask2FormerTransformerModule,
    dice_loss,
    pair_wise_dice_loss,
    pair_wise_sigmoid_cross_entropy_loss,
    sample_point,
    sigmoid_cross_entropy_loss,
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


def sample_label_masks(label: torch.Tensor, classes: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """What grid_sample (bilinear, align_corners=False, zero padding) reads from the binary mask of
    `classes[n]` at `points[n]`, computed from the label map: [H, W], [N], [N or 1, P, 2] in [0, 1]
    -> [N, P]. A pixel of another class, ignore (255) included, counts 0."""
    height, width = label.shape
    x = ((2 * points[..., 0] - 1 + 1) * width - 1) / 2  # grid_sample's unnormalisation, step by step
    y = ((2 * points[..., 1] - 1 + 1) * height - 1) / 2
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0  # grid_sample's arithmetic: its weights are (1 - f, f) per axis
    flat, wanted = label.flatten(), classes[:, None]
    sampled = torch.zeros(len(classes), points.shape[-2], dtype=points.dtype, device=points.device)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):  # nw, ne, sw, se: its order of summation
        cx, cy = x0 + dx, y0 + dy
        weight = (fy if dy else 1 - fy) * (fx if dx else 1 - fx)
        inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
        index = (cy.clamp(0, height - 1) * width + cx.clamp(0, width - 1)).long()
        sampled += weight * ((flat[index] == wanted) & inside)
    return sampled


class LabelMapMatcher(Mask2FormerHungarianMatcher):
    """transformers' matcher (same random points, costs and assignment) on (label map, classes) targets."""

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        indices = []
        for pred_masks, pred_logits, (label, classes) in zip(
            masks_queries_logits, class_queries_logits, mask_labels
        ):
            cost_class = -pred_logits.softmax(-1)[:, classes]
            points = torch.rand(1, self.num_points, 2, device=pred_masks.device)
            target = sample_label_masks(label, classes, points).to(pred_masks)
            pred = sample_point(
                pred_masks[:, None], points.repeat(len(pred_masks), 1, 1), align_corners=False
            )
            pred = pred.squeeze(1)
            cost = (
                self.cost_mask * pair_wise_sigmoid_cross_entropy_loss(pred, target)
                + self.cost_class * cost_class
                + self.cost_dice * pair_wise_dice_loss(pred, target)
            )
            top = torch.finfo(cost.dtype).max  # as transformers: invalid costs are matched last
            rows, cols = linear_sum_assignment(torch.nan_to_num(cost, nan=top, posinf=top, neginf=top).cpu())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices


class LabelMapMask2FormerLoss(Mask2FormerLoss):
    """transformers' loss on targets given as one (label map [H, W], present classes [K]) per image, with
    the target-mask count averaged over ranks by torch.distributed (as the original Mask2Former does;
    transformers only does this under accelerate)."""

    def __init__(self, config: Mask2FormerConfig, weight_dict: dict[str, float]) -> None:
        super().__init__(config, weight_dict)
        self.matcher = LabelMapMatcher(
            cost_class=config.class_weight,
            cost_dice=config.dice_weight,
            cost_mask=config.mask_weight,
            num_points=self.num_points,
        )

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        pred_masks = masks_queries_logits[self._get_predictions_permutation_indices(indices)][:, None]
        with torch.no_grad():
            points = self.sample_points_using_uncertainty(
                pred_masks,
                self.calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            counts = [len(rows) for rows, _ in indices]
            targets = [
                sample_label_masks(label, classes[cols], chunk)
                for (label, classes), (_, cols), chunk in zip(mask_labels, indices, points.split(counts))
            ]
            point_labels = torch.cat(targets).to(pred_masks.dtype)
        point_logits = sample_point(pred_masks, points, align_corners=False).squeeze(1)
        return {
            "loss_mask": sigmoid_cross_entropy_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    def get_num_masks(self, class_labels: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        num_masks = torch.tensor(float(sum(len(c) for c in class_labels)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        return num_masks.clamp(min=1)


class LevelwiseDeformableAttention(Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
    """transformers' pixel-decoder deformable attention (same parameters, same outputs to rounding) that
    weights each level's samples as it takes them, instead of stacking every level's samples first
    (the step's time with and without it: docs/segment.md)."""

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        position_embeddings=None,
        reference_points=None,
        spatial_shapes_list=None,
        level_start_index=None,
        output_attentions=False,
    ):
        queries = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        batch, num_queries, _ = queries.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(encoder_hidden_states)
        if attention_mask is not None:
            value = value.masked_fill(attention_mask[..., None], 0.0)
        value = value.view(batch, -1, heads, self.d_model // heads)
        offsets = self.sampling_offsets(queries).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(queries).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        # The pixel decoder's reference points are (x, y) per level; offsets are in that level's pixels.
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes_list], device=value.device)
        grids = 2 * (reference_points[:, :, None, :, None, :] + offsets / normalizer[:, None, :]) - 1
        output = 0
        values = value.split([h * w for h, w in spatial_shapes_list], dim=1)
        for level, (level_value, (height, width)) in enumerate(zip(values, spatial_shapes_list)):
            level_value = level_value.flatten(2).transpose(1, 2).reshape(batch * heads, -1, height, width)
            grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [batch * heads, queries, points, 2]
            sampled = nn.functional.grid_sample(level_value, grid, padding_mode="zeros", align_corners=False)
            level_weights = (
                weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, num_queries, points)
            )
            output = output + (sampled * level_weights).sum(-1)
        output = output.view(batch, self.d_model, num_queries).transpose(1, 2)
        return self.output_proj(output), weights


class Mask2FormerDecodeHead(Mask2FormerPreTrainedModel):
    """Pixel decoder + transformer decoder + class predictor + loss, initialised as transformers does."""

    def __init__(self, config: Mask2FormerConfig, in_channels: list[int]) -> None:
        super().__init__(config)
        self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=in_channels)
        for layer in self.pixel_decoder.encoder.layers:  # the same module, its levels summed one by one
            layer.self_attn.__class__ = LevelwiseDeformableAttention
        self.transformer_module = Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight}
        self.weight_dict = weights | {"loss_dice": config.dice_weight}
        self.criterion = LabelMapMask2FormerLoss(config=config, weight_dict=self.weight_dict)
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


def present_classes(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """Per image, the classes its label map holds (ignore 255 and labels >= num_classes are none)."""
    present = [torch.unique(label) for label in labels]
    return [p[(p != IGNORE_INDEX) & (p < num_classes)].long() for p in present]


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
        target_classes = present_classes(labels, self.num_classes)
        auxiliary = [
            {"masks_queries_logits": m.float(), "class_queries_logits": c.float()}
            for m, c in zip(mask_logits[:-1], class_logits[:-1])
        ]
        head = self.decode_head
        losses = head.criterion(
            masks_queries_logits=mask_logits[-1].float(),
            class_queries_logits=class_logits[-1].float(),
            mask_labels=list(zip(labels, target_classes)),
            class_labels=target_classes,
            auxiliary_predictions=auxiliary,
        )
        weighted = {
            key: value * next(w for name, w in head.weight_dict.items() if key.startswith(name))
            for key, value in losses.items()
        }
        metrics = {name: weighted[name].detach() for name in head.weight_dict}  # the last layer's terms
        return sum(weighted.values()), metrics
