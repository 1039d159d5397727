"""Detection and instance segmentation (paper section 4.3): `flyeva detect train|eval|predict`.

Cascade Mask R-CNN on a ViTDet-adapted EVA, as the release (`EVA-01/det`), built from torchvision's
detection parts. Import-light on purpose: the CLI imports this package to register its commands;
torch is imported when a verb runs.
"""

from __future__ import annotations

import argparse

from flyeva.engine.stage import Stage, Verb

HELP = "detection and instance segmentation: train, eval, predict"
DETECT = Stage(
    command="detect",
    help="train a detector (default: the miniature recipe on ShapeWorld)",
    config="flyeva.tasks.detect.config:DetectConfig",
    build="flyeva.tasks.detect.run:build_train",
    check="flyeva.tasks.detect.config:validate",
    primary="bbox_AP",
    verbs={
        "eval": Verb(
            "box and mask AP of model.init on the validation set -> OUTPUT/eval.json",
            "flyeva.tasks.detect:eval_verb",
        ),
        "predict": Verb(
            "draw detections of model.init onto PNGs",
            "flyeva.tasks.detect:predict_verb",
            positional="image files or folders",
            arguments=(
                (("--out",), dict(required=True, help="folder for the drawn PNGs")),
                (("--threshold",), dict(type=float, default=0.5, help="lowest score drawn")),
            ),
        ),
    },
)
STAGES = (DETECT,)


def eval_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.detect.run import run_eval

    record = run_eval(cfg)
    metrics = record.get("metrics", {})
    if metrics:
        line = ", ".join(
            f"{kind} AP {metrics[f'{kind}_AP']:.4f} AP50 {metrics[f'{kind}_AP50']:.4f}"
            for kind in ("bbox", "segm")
            if f"{kind}_AP" in metrics
        )
        print(f"detect eval: {line} (written to {cfg.train.output_dir}/eval.json)")


def predict_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.detect.predict import run_predict

    written = run_predict(cfg, args.inputs, args.out, args.threshold)
    print(f"predict: wrote {len(written)} images to {args.out}")
