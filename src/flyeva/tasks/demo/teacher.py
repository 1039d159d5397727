"""The miniature world's CLIP teacher: trained once from ShapeWorld captions, then reused.

`flyeva pretrain` (when its recipe names `teacher.train_recipe`) and `flyeva demo` both come here,
so the teacher is bootstrapped in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flyeva.config import ConfigError, load_config, recipe_path
from flyeva.engine import distributed as D
from flyeva.engine.loop import TrainResult


def ensure_teacher(
    final: Path, recipe: str = "miniature", overrides: Sequence[str] = ()
) -> TrainResult | None:
    """Train the teacher of `flyeva clip train --config recipe` into `final`'s parent unless `final` exists.

    Returns the training result, or None when the teacher was already there. Under torchrun rank 0
    writes it and every rank waits for it.
    """
    from flyeva.tasks.clip.recipe import ClipConfig, run_clip_train

    if final.name != "final":
        raise ConfigError(f"teacher.path {final} must be the `final` folder that `flyeva clip train` writes")
    if final.exists():
        return None
    print(f"no teacher at {final}: training it once with the clip recipe {recipe!r}")
    result = run_clip_train(
        load_config(ClipConfig, recipe_path("clip", recipe), [*overrides, f"train.output_dir={final.parent}"])
    )
    D.barrier()
    return result
