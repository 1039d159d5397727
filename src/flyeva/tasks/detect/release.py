"""Release detection checkpoints (`EVA-01/det`, detectron2 names) -> flyeva's `EvaDetector`.

The RPN and heads are torchvision's parts. Buffers detectron2 stores (pixel statistics, anchors) are
dropped; any other unknown key is an error that names it. The backbone geometry (window, global
blocks, heads) and the label set are read off the tensors' shapes.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from flyeva.models.convert import block_count

DETECTRON2_DROPPED = ("pixel_mean", "pixel_std", "proposal_generator.anchor_generator.")
# (detectron2 pattern, flyeva replacement)
_DETECTRON2_RULES = [
    (r"^proposal_generator\.rpn_head\.conv\.conv(\d+)\.", r"proposal_generator.head.conv.\1.0."),
    (r"^proposal_generator\.rpn_head\.objectness_logits\.", "proposal_generator.head.cls_logits."),
    (r"^proposal_generator\.rpn_head\.anchor_deltas\.", "proposal_generator.head.bbox_pred."),
    (r"^roi_heads\.mask_head\.deconv\.", "roi_heads.mask_predictor.conv5_mask."),
    (r"^roi_heads\.mask_head\.predictor\.", "roi_heads.mask_predictor.mask_fcn_logits."),
]


def _shift(match: re.Match, template: str) -> str:
    """conv1 -> 0 (torchvision's Sequential counts from 0, detectron2's names from 1)."""
    return template.format(stage=match.group(1), index=int(match.group(2)) - 1)


def detectron2_key(key: str, num_box_convs: int) -> str | None:
    """The flyeva name of one detectron2 key; None for buffers flyeva does not keep."""
    if key.startswith(DETECTRON2_DROPPED):
        return None
    if key.startswith(("backbone.", "roi_heads.box_predictor.")):
        return key  # same module tree
    for pattern, replacement in _DETECTRON2_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.conv(\d+)\.norm\.(weight|bias)$", key):
        return _shift(match, "roi_heads.box_head.{stage}.{index}.1.") + match.group(3)
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.conv(\d+)\.weight$", key):
        return _shift(match, "roi_heads.box_head.{stage}.{index}.0.weight")
    if match := re.match(r"^roi_heads\.box_head\.(\d+)\.fc1\.(weight|bias)$", key):
        # torchvision's FastRCNNConvFCHead: convs, Flatten, then the Linear
        return f"roi_heads.box_head.{match.group(1)}.{num_box_convs + 1}.{match.group(2)}"
    if match := re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(weight|bias)$", key):
        return f"roi_heads.mask_head.{int(match.group(1)) - 1}.1.{match.group(2)}"
    if match := re.match(r"^roi_heads\.mask_head\.mask_fcn(\d+)\.weight$", key):
        return f"roi_heads.mask_head.{int(match.group(1)) - 1}.0.weight"
    raise ValueError(
        f"release detection checkpoint key {key!r} has no flyeva counterpart; is this an EVA-01/det file?"
    )


def is_release_detector(state: dict[str, Any]) -> bool:
    """A detectron2 EVA detector, or its ViTDet backbone alone (`backbone.net.*`)."""
    return any(k.startswith("backbone.net.blocks.") for k in state)


def detector_state_from_release(state: dict[str, Tensor], num_box_convs: int = 4) -> dict[str, Tensor]:
    """A detectron2 EVA Cascade Mask R-CNN state dict renamed to flyeva's `EvaDetector`."""
    names = {key: detectron2_key(key, num_box_convs) for key in state}
    return {name: state[key] for key, name in names.items() if name is not None}


def release_detector_arch(state: dict[str, Tensor]) -> dict[str, Any]:
    """Backbone and head sizes read off a release detector state dict. Window, global blocks and heads
    come from the rel-pos tables: 2 window - 1 rows (more in global blocks), a column per head channel."""
    depth = block_count(state, "backbone.net.blocks.")
    rows = [state[f"backbone.net.blocks.{i}.attn.rel_pos_h"].shape[0] for i in range(depth)]
    patch = state["backbone.net.patch_embed.proj.weight"]
    scores = state.get("roi_heads.box_predictor.0.cls_score.weight")
    return {
        "embed_dim": patch.shape[0],
        "depth": depth,
        "mlp_dim": state["backbone.net.blocks.0.mlp.fc1.weight"].shape[0],
        "patch_size": patch.shape[-1],
        "pos_grid": round((state["backbone.net.pos_embed"].shape[1] - 1) ** 0.5),
        "num_classes": None if scores is None else scores.shape[0] - 1,  # None: a backbone-only file
        "has_masks": any(k.startswith("roi_heads.mask_head.") for k in state),  # Objects365: boxes only
        "window": (min(rows) + 1) // 2,
        "global_blocks": [i for i, n in enumerate(rows) if n != min(rows)],
        "num_heads": patch.shape[0] // state["backbone.net.blocks.0.attn.rel_pos_h"].shape[1],
    }
