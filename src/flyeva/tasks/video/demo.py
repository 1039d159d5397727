"""The video stage of `flyeva demo`: the miniature video recipe from an EVA encoder vs from random init.

Both runs see the same ShapeWorld clips (written once under `out_dir/data`), the same recipe
(configs/video/miniature.yaml) and the same seed; only `model.init` differs. Reported, not tuned
to agree: the two top-1s, mean class accuracies and the chance level.
"""

from __future__ import annotations

from pathlib import Path

from flyeva.config import load_config, recipe_path

QUICK_OVERRIDES = ["data.train.num_samples=128", "data.val.num_samples=64", "train.epochs=1"]


def _run(
    out_dir: Path, data: dict[str, Path], init: str, seed: int, overrides: list[str]
) -> dict[str, float]:
    from flyeva.engine.stage import run_stage
    from flyeva.tasks.video import VIDEO
    from flyeva.tasks.video.config import VideoConfig

    settings = [
        f"train.output_dir={out_dir}",
        f"train.seed={seed}",
        f"model.init='{init}'",
        f"data.train.path={data['train']}",
        f"data.val.path={data['val']}",
        f"data.classes={data['classes']}",
        "train.device=cpu",
        "train.progress=false",
        "train.tensorboard=false",
        "train.num_workers=0",
        *overrides,
    ]
    record = run_stage(VIDEO, load_config(VideoConfig, recipe_path("video", "miniature"), settings))
    return {"top1": record["metrics"]["top1"], "mean_class_top1": record["metrics"]["mean_class_top1"]}


def run_demo_stage(out_dir: Path, init: str | None, seed: int, *, quick: bool = False) -> dict[str, float]:
    """Train the miniature video model from `init` (a miniature encoder/MIM folder) and from random init.

    Returns `eva_top1`, `eva_mean_class_top1` (when `init` is given), `random_top1`,
    `random_mean_class_top1` and `chance_top1` (percent, on held-out clips).
    """
    from flyeva.data.video.datasets import write_shapeworld_clips
    from flyeva.tasks.video.config import VideoConfig

    out_dir = Path(out_dir)
    recipe = load_config(VideoConfig, recipe_path("video", "miniature"), QUICK_OVERRIDES if quick else [])
    data: dict[str, Path] = {}
    for role, split in (("train", recipe.data.train), ("val", recipe.data.val)):
        folder = out_dir / "data" / role
        data[role] = write_shapeworld_clips(
            folder, split.num_samples, seed=split.seed, image_size=split.image_size, num_frames=16
        )
    data["classes"] = out_dir / "data" / "train" / "classes.txt"
    num_classes = len(data["classes"].read_text().split("\n")) - 1
    overrides = QUICK_OVERRIDES if quick else []
    result: dict[str, float] = {"chance_top1": 100.0 / num_classes}
    runs = [("random", "")] + ([("eva", str(init))] if init else [])
    for name, weights in runs:
        scores = _run(out_dir / name, data, weights, seed, overrides)
        result.update({f"{name}_{key}": value for key, value in scores.items()})
    return result
