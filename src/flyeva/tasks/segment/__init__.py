"""Semantic segmentation transfer (paper section 4.2): `flyeva segment train|eval|predict`.

Import-light: the CLI imports it to register the commands; torch, timm, transformers load when a verb runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from flyeva.engine.stage import Stage, Verb, verb_output, weights_options

HELP = "semantic segmentation: train, eval, predict"
WEIGHTS_HELP = "segmenter folder (default: the recipe's OUTPUT/final, e.g. runs/miniature_segment/final)"
SEGMENT = Stage(
    command="segment",
    help="train a segmenter (UperNet or Mask2Former on EVA) on the shared engine",
    config="flyeva.tasks.segment.config:SegmentConfig",
    build="flyeva.tasks.segment.run:build_segment",
    check="flyeva.tasks.segment.config:resolve",
    primary="mIoU",
    verbs={
        "eval": Verb(
            "mIoU / mAcc / aAcc / per-class IoU of a segmenter -> OUTPUT/eval.json",
            "flyeva.tasks.segment:eval_verb",
            arguments=weights_options(WEIGHTS_HELP),
        ),
        "predict": Verb(
            "colour overlays (PNG, beside the ground truth where a label exists) and paletted label maps",
            "flyeva.tasks.segment:predict_verb",
            positional="image files or folders",
            arguments=weights_options(WEIGHTS_HELP),
        ),
    },
)
STAGES = (SEGMENT,)


def _weights(cfg, args: argparse.Namespace) -> str:
    """--weights, else weights=, else the recipe's training output (OUTPUT/final)."""
    cfg.weights = args.weights or cfg.weights or str(Path(cfg.train.output_dir) / "final")
    return cfg.weights


def eval_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.segment.run import run_eval

    output = verb_output(args, "segment", "eval", _weights(cfg, args), cfg.train.output_dir)
    cfg.train.output_dir = str(output)
    record = run_eval(cfg)
    if record:
        numbers = ", ".join(f"{k} {record['metrics'][k]:.4f}" for k in ("mIoU", "mAcc", "aAcc"))
        print(f"segment eval: {numbers}; written to {cfg.train.output_dir}/eval.json")


def predict_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.segment.predict import run_predict

    output = verb_output(args, "segment", "predict", _weights(cfg, args), cfg.train.output_dir)
    written = run_predict(cfg, cfg.weights, args.inputs, str(output))
    print(f"wrote {len(written)} overlays to {output}")
