"""The video stage of `flyeva demo`: the miniature video recipe from a pretrained encoder or from random init.

Every run reads the same clips with the same recipe at the demo's budget; only the init and the
from-pretrained settings differ (docs/demo.md, the recipe rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flyeva.config import load_config, recipe_path
from flyeva.data.video.datasets import read_class_names, write_shapeworld_clips
from flyeva.engine.stage import run_stage
from flyeva.tasks.video import VIDEO
from flyeva.tasks.video.config import VideoConfig

QUICK_OVERRIDES = ["data.train.num_samples=128", "data.val.num_samples=64", "train.epochs=1"]
# Half the recipe's 8 epochs, evaluated once at the end: 3 seeds x 2 arms fit the demo's 30 minutes.
BUDGET_OVERRIDES = ["train.epochs=4", "train.eval_every_epochs=4"]
# The release's K722 stage from the MIM encoder (docs/recipes.md §8): drop path 0.3 over 40 blocks,
# scaled to the miniature's 4; the temporal position and tubelet motion terms (docs/demo.md, video).
PRETRAINED_OVERRIDES = [
    "model.drop_path_rate=0.03",
    "model.temporal_pos_std=0.02",
    "model.tubelet_motion=1.0",
]


def write_demo_clips(out_dir: Path, quick: bool = False) -> dict[str, str | float]:
    """The recipe's training and held-out clips under `out_dir` (once); their paths and chance top-1 (%)."""
    recipe = load_config(VideoConfig, recipe_path("video", "miniature"), QUICK_OVERRIDES if quick else [])
    data: dict[str, str | float] = {}
    for role, split in (("train", recipe.data.train), ("val", recipe.data.val)):
        clips = dict(seed=split.seed, image_size=split.image_size, num_frames=16)
        data[role] = str(write_shapeworld_clips(Path(out_dir) / role, split.num_samples, **clips))
    data["classes"] = str(Path(out_dir) / "train" / "classes.txt")
    data["chance_top1"] = 100.0 / len(read_class_names(data["classes"]))
    return data


def run_demo_stage(
    out_dir: Path,
    init: str | None,
    seed: int,
    *,
    data: dict[str, str | float],
    quick: bool = False,
    extra: Sequence[str] = (),
) -> dict[str, float]:
    """Train the miniature video model on `data` (`write_demo_clips`) from `init` (a miniature MIM or
    encoder folder, inflated, with the from-pretrained settings) or from random init (None); returns
    `top1` and `mean_class_top1` (percent, on the held-out clips). `extra`: overrides applied last."""
    settings = [
        f"train.output_dir={out_dir}",
        f"train.seed={seed}",
        f"model.init='{init or ''}'",
        f"data.train.path={data['train']}",
        f"data.val.path={data['val']}",
        f"data.classes={data['classes']}",
        "train.device=cpu",
        "train.progress=false",
        "train.tensorboard=false",
        "train.num_workers=0",
        *BUDGET_OVERRIDES,
        *(QUICK_OVERRIDES if quick else []),
        *(PRETRAINED_OVERRIDES if init else []),
        *extra,
    ]
    record = run_stage(VIDEO, load_config(VideoConfig, recipe_path("video", "miniature"), settings))
    return {key: record["metrics"][key] for key in ("top1", "mean_class_top1")}
