"""Mask2Former's recipe section, apart from the model so that configs load without transformers."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Mask2FormerSection:
    """Decoder sizes and loss weights; defaults are the release's EVA-g recipe (docs/segment.md)."""

    num_queries: int = 200
    hidden_dim: int = 1024  # pixel-decoder, mask-feature and query width
    num_heads: int = 32
    dim_feedforward: int = 4096
    encoder_layers: int = 6  # deformable pixel decoder
    decoder_layers: int = 8  # masked-attention layers (transformers adds one: the query-only prediction)
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    train_num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
