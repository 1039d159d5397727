"""Semantic segmentation transfer (paper section 4.2): `flyeva segment train|eval|predict`.

Import-light on purpose: the CLI imports this package to register its commands; torch, timm and
transformers are imported when a verb runs.
"""

from __future__ import annotations

import argparse

from flyeva.engine.stage import Stage, Verb

HELP = "semantic segmentation: train, eval, predict"
SEGMENT = Stage(
    command="segment",
    help="train a segmenter (UperNet or Mask2Former on EVA) on the shared engine",
    config="flyeva.tasks.segment.config:SegmentConfig",
    build="flyeva.tasks.segment.run:build_segment",
    check="flyeva.tasks.segment.config:resolve",
    primary="mIoU",
    verbs={
        "eval": Verb(
            "mIoU / mAcc / aAcc / per-class IoU of weights=FOLDER; writes OUTPUT/eval.json",
            "flyeva.tasks.segment:eval_verb",
        ),
        "predict": Verb(
            "colour overlays (PNG) of a segmenter's predictions",
            "flyeva.tasks.segment:predict_verb",
            positional="image files or folders",
            arguments=(
                (("--weights",), dict(required=True, help="a segmenter folder (OUTPUT/final)")),
                (("--out",), dict(required=True, help="folder for overlays and label PNGs")),
            ),
        ),
    },
)
STAGES = (SEGMENT,)


def eval_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.segment.run import run_eval

    record = run_eval(cfg)
    if record:
        numbers = ", ".join(f"{k} {record['metrics'][k]:.4f}" for k in ("mIoU", "mAcc", "aAcc"))
        print(f"segment eval: {numbers}; {cfg.train.output_dir}/eval.json")


def predict_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.segment.predict import run_predict

    written = run_predict(cfg, args.weights, args.inputs, args.out)
    print(f"wrote {len(written)} overlays to {args.out}")
