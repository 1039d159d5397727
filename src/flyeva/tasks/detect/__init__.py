"""Detection and instance segmentation (paper section 4.3): `flyeva detect train|eval|predict`.

Cascade Mask R-CNN on a ViTDet-adapted EVA, as the release (`EVA-01/det`), built from torchvision's
detection parts. Import-light on purpose: the CLI imports this package to register its commands;
torch is imported when a verb runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flyeva.engine.stage import Stage, Verb, verb_output, weights_options

HELP = "detection and instance segmentation: train, eval, predict"
WEIGHTS_HELP = "detector folder (default: the recipe's OUTPUT/final, e.g. runs/miniature_detect/final)"
DETECT = Stage(
    command="detect",
    help="train a detector (default: the miniature recipe on ShapeWorld)",
    config="flyeva.tasks.detect.config:DetectConfig",
    build="flyeva.tasks.detect.run:build_train",
    check="flyeva.tasks.detect.config:validate",
    primary="bbox_AP",
    verbs={
        "eval": Verb(
            "box and mask AP of a detector on the validation set -> OUTPUT/eval.json",
            "flyeva.tasks.detect:eval_verb",
            arguments=weights_options(WEIGHTS_HELP),
        ),
        "predict": Verb(
            "draw a detector's detections onto PNGs",
            "flyeva.tasks.detect:predict_verb",
            positional="image files or folders",
            arguments=(
                *weights_options(WEIGHTS_HELP),
                (("--threshold",), dict(type=float, default=0.5, help="lowest score drawn")),
            ),
        ),
    },
)
STAGES = (DETECT,)


def _weights(cfg, args: argparse.Namespace) -> str:
    """--weights, else model.init, else the recipe's training output (OUTPUT/final)."""
    cfg.model.init = args.weights or cfg.model.init or str(Path(cfg.train.output_dir) / "final")
    return cfg.model.init


def eval_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.detect.run import run_eval

    cfg.train.output_dir = str(verb_output(args, "detect", "eval", _weights(cfg, args), cfg.train.output_dir))
    record = run_eval(cfg)
    metrics = record.get("metrics", {})
    if metrics:
        line = ", ".join(
            f"{kind} AP {metrics[f'{kind}_AP']:.4f} AP50 {metrics[f'{kind}_AP50']:.4f}"
            for kind in ("bbox", "segm")
            if f"{kind}_AP" in metrics
        )
        print(f"detect eval: {line}; written to {cfg.train.output_dir}/eval.json")


def predict_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.detect.predict import run_predict

    output = verb_output(args, "detect", "predict", _weights(cfg, args), cfg.train.output_dir)
    written = run_predict(cfg, args.inputs, str(output), args.threshold)
    print(f"predict: wrote {len(written)} images to {output}")
