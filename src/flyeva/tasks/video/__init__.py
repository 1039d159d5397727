"""Video action recognition (paper section 4.2; docs/video.md): `flyeva video train|eval`.

Import-light on purpose: the CLI imports this package on every call (zero-shot video recognition
with EVA-CLIP is `flyeva clip zeroshot` with a video set).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flyeva.engine.stage import Stage, Verb, verb_output, weights_options

HELP = "video action recognition: train, eval"
VIDEO = Stage(
    command="video",
    help="fine-tune a video EVA on clips (default: the miniature recipe)",
    config="flyeva.tasks.video.config:VideoConfig",
    build="flyeva.tasks.video.run:build_video",
    check="flyeva.tasks.video.config:check_config",
    primary="top1",
    verbs={
        "eval": Verb(
            "multi-view evaluation of a trained video model; writes OUTPUT/eval.json",
            "flyeva.tasks.video:eval_verb",
            arguments=weights_options("video model folder (default: the recipe's OUTPUT/final)"),
        ),
    },
)
STAGES = (VIDEO,)


def eval_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.video.run import run_eval

    cfg.model.init = args.weights or cfg.model.init or str(Path(cfg.train.output_dir) / "final")
    cfg.train.output_dir = str(verb_output(args, "video", "eval", cfg.model.init, cfg.train.output_dir))
    record = run_eval(cfg)
    if record:
        metrics, facts, details = record["metrics"], record["facts"], record["details"]
        views = f"{facts['views']} clips x {facts['crops']} crops, {details['videos']} videos"
        numbers = f"top-1 {metrics['top1']:.2f} top-5 {metrics['top5']:.2f}"
        print(
            f"video eval ({views}, {details['skipped_videos']} unreadable): {numbers} "
            f"mean class {metrics['mean_class_top1']:.2f}; written to {cfg.train.output_dir}/eval.json"
        )
