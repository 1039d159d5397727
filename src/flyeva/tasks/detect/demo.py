"""The detection stage of `flyeva demo`: the miniature Cascade Mask R-CNN, pretrained or from scratch.

ShapeWorld at 64 px with the demo encoder's patch 4, so a pretrained miniature EVA loads without
resizing its patch kernel; a pretrained start adds the release's from-pretrained layer decay and
drop path (docs/demo.md). Reported as measured, not tuned to agree (docs/detect.md).
"""

from __future__ import annotations

from pathlib import Path

DEMO_OVERRIDES = [
    "train.device=cpu",
    "train.precision=fp32",
    "train.progress=false",
    "train.tensorboard=false",
    "train.num_workers=0",
]
# The release's COCO recipe (docs/recipes.md §6): layer decay 0.9 per layer, drop path 0.6 over 40
# blocks, scaled to the miniature's 4.
PRETRAINED_OVERRIDES = ["optim.layer_decay=0.9", "model.drop_path_rate=0.06"]


def run_demo_stage(
    out_dir: Path,
    init: str | None,
    seed: int,
    *,
    steps: int = 200,
    train_images: int = 1024,
    val_images: int = 128,
) -> dict[str, float]:
    """Train `flyeva detect train --config miniature` for `steps` steps (from `init`, a pretrained encoder
    folder, with the from-pretrained recipe; else from scratch) and return its validation box and
    mask AP / AP50 (COCO's definitions, in [0, 1])."""
    from flyeva.config import load_config, recipe_path
    from flyeva.engine.stage import run_stage
    from flyeva.tasks.detect import DETECT
    from flyeva.tasks.detect.config import DetectConfig

    overrides = [
        *DEMO_OVERRIDES,
        *(PRETRAINED_OVERRIDES if init else []),
        f"train.output_dir={out_dir}",
        f"train.seed={seed}",
        f"model.init='{init or ''}'",
        f"data.shapeworld_train={train_images}",
        f"data.shapeworld_val={val_images}",
        f"data.shapeworld_seed={seed}",
        f"train.max_steps={steps}",
        f"optim.decay_steps=[{int(steps * 5 / 6)}]",  # x0.1 at 5/6 of the run, as 250 of 300
    ]
    cfg = load_config(DetectConfig, recipe_path("detect", "miniature"), overrides)
    metrics = run_stage(DETECT, cfg)["metrics"]
    return {
        "box_AP": metrics["bbox_AP"],
        "box_AP50": metrics["bbox_AP50"],
        "mask_AP": metrics["segm_AP"],
        "mask_AP50": metrics["segm_AP50"],
    }
