"""The segmentation stage of `flyeva demo`: the miniature UperNet recipe, pretrained or from scratch.

ShapeWorld at 32 px with patch 4, the demo's pretraining geometry, so a pretrained miniature EVA
loads without resizing its patch kernel or position table. A pretrained start adds the release's
from-pretrained layer decay and drop path (docs/demo.md, the recipe rule). Reported as measured, not
tuned to agree (docs/segment.md).
"""

from __future__ import annotations

from pathlib import Path

DEMO_OVERRIDES = [
    "data.shapeworld_size=32",
    "model.patch_size=4",
    "aug.crop_size=32",
    "aug.scale=[128,32]",
    "train.device=cpu",
    "train.precision=fp32",
    "train.progress=false",
    "train.tensorboard=false",
    "train.num_workers=0",
]
# The release's UperNet recipe (docs/recipes.md §7): layer decay 0.9 per layer, drop path 0.5 over 40
# blocks, scaled to the miniature's 4.
PRETRAINED_OVERRIDES = ["optim.layer_decay=0.9", "model.drop_path_rate=0.05"]


def run_demo_stage(
    out_dir: Path, init: str | None, seed: int, *, steps: int = 300, train_images: int = 1024
) -> dict[str, float]:
    """Train `flyeva segment train --config miniature` for `steps` steps (from `init`, a pretrained
    folder, with the from-pretrained recipe; else the release's random init) and return its
    validation mIoU, mAcc, aAcc."""
    from flyeva.config import load_config, recipe_path
    from flyeva.engine.stage import run_stage
    from flyeva.tasks.segment import SEGMENT
    from flyeva.tasks.segment.config import SegmentConfig

    epochs = 3  # evaluated after each: the curve from chance upward
    overrides = [
        *DEMO_OVERRIDES,
        *(PRETRAINED_OVERRIDES if init else []),
        f"train.output_dir={out_dir}",
        f"train.seed={seed}",
        f"model.init='{init or ''}'",
        f"data.shapeworld_train={train_images}",
        f"train.epochs={epochs}",
        f"train.steps_per_epoch={max(1, steps // epochs)}",
        f"data.shapeworld_seed={seed}",
    ]
    record = run_stage(SEGMENT, load_config(SegmentConfig, recipe_path("segment", "miniature"), overrides))
    return {key: float(record["metrics"][key]) for key in ("mIoU", "mAcc", "aAcc")}
