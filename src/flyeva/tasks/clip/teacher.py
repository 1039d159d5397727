"""The miniature world's CLIP teacher, trained once from ShapeWorld captions for `flyeva pretrain` (when
its recipe names `teacher.train_recipe`) and `flyeva demo`, then reused."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.engine import distributed as D
from flyeva.engine.stage import run_stage
from flyeva.tasks.clip import CLIP_TRAIN
from flyeva.tasks.clip.config import ClipConfig


def ensure_recipe_teacher(cfg: Any) -> None:
    """`flyeva pretrain`'s preparation: the recipe's teacher (`teacher.train_recipe`) trained once."""
    if cfg.teacher.train_recipe and cfg.teacher.path:
        ensure_teacher(Path(cfg.teacher.path), cfg.teacher.train_recipe, [f"train.device={cfg.train.device}"])


def ensure_teacher(
    final: Path, recipe: str = "miniature", overrides: Sequence[str] = ()
) -> dict[str, Any] | None:
    """Train the teacher of `flyeva clip train --config recipe` into `final`'s parent unless `final` exists;
    the training result record, or None when the teacher was already there."""
    if final.name != "final":
        raise ConfigError(f"teacher.path {final} must be the `final` folder that `flyeva clip train` writes")
    if final.exists():
        return None
    print(f"no teacher at {final}: training it once with the clip recipe {recipe!r}")
    overrides = [*overrides, f"train.output_dir={final.parent}"]
    result = run_stage(CLIP_TRAIN, load_config(ClipConfig, recipe_path("clip", recipe), overrides))
    D.barrier()
    return result
