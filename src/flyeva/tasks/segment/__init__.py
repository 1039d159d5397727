"""Semantic segmentation transfer (paper section 4.2): `flyeva segment train|eval|predict`.

Import-light on purpose: the CLI imports this package to register its commands; torch, timm and
transformers are imported inside the handlers.
"""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "miniature"  # UperNet on ShapeWorld: minutes on a 2-core laptop
HELP = {
    "train": "train a segmenter (UperNet or Mask2Former on EVA) on the shared engine",
    "eval": "mIoU / mAcc / aAcc / per-class IoU of weights=FOLDER; writes OUTPUT/eval.json",
}


def _run(args: argparse.Namespace) -> None:
    from flyeva.config import load_config, recipe_path, to_yaml
    from flyeva.tasks.segment.recipe import SegmentConfig, run_eval, run_train

    cfg = load_config(SegmentConfig, recipe_path("segment", args.config), args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    summary = (run_train if args.segment_task == "train" else run_eval)(cfg)
    if summary:
        print(
            f"segment {args.segment_task}: mIoU {summary['mIoU']:.4f} mAcc {summary['mAcc']:.4f} "
            f"aAcc {summary['aAcc']:.4f}; {cfg.train.output_dir}/eval.json"
        )


def _predict(args: argparse.Namespace) -> None:
    from flyeva.config import load_config, recipe_path
    from flyeva.tasks.segment.predict import run_predict
    from flyeva.tasks.segment.recipe import SegmentConfig

    cfg = load_config(SegmentConfig, recipe_path("segment", args.config), args.overrides)
    written = run_predict(cfg, args.weights, args.images, args.out)
    print(f"wrote {len(written)} overlays to {args.out}")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva segment ...` to the CLI."""
    segment = commands.add_parser("segment", help="semantic segmentation: train, eval, predict")
    tasks = segment.add_subparsers(dest="segment_command", required=True)
    for task in ("train", "eval"):
        sub = tasks.add_parser(task, help=HELP[task])
        sub.add_argument(
            "--config", default=DEFAULT_RECIPE, help="recipe name in configs/segment/ or a YAML path"
        )
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data/ade")
        sub.set_defaults(func=_run, segment_task=task)
    predict = tasks.add_parser("predict", help="colour overlays (PNG) of a segmenter's predictions")
    predict.add_argument("images", help="an image file or a folder of images")
    predict.add_argument(
        "--weights", required=True, help="a segmenter folder (OUTPUT/final of segment train)"
    )
    predict.add_argument("--out", required=True, help="folder for <name>.png overlays and <name>_labels.png")
    predict.add_argument("--config", default=DEFAULT_RECIPE, help="recipe whose eval.* settings apply")
    predict.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.mode=whole")
    predict.set_defaults(func=_predict)
