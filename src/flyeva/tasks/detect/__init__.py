"""Detection and instance segmentation (paper section 4.3): `flyeva detect train|eval|predict`.

Cascade Mask R-CNN on a ViTDet-adapted EVA, as the release (`EVA-01/det`), built from torchvision's
detection parts. Import-light on purpose: the CLI imports this package to register its commands;
torch is imported inside the handlers.
"""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "miniature"  # runs on a 2-core laptop in a few minutes (ShapeWorld export)
HELP = {
    "train": "train a detector (default: the miniature recipe on ShapeWorld)",
    "eval": "box and mask AP of model.init on the validation set -> OUTPUT/eval.json",
    "predict": "draw detections of model.init onto PNGs",
}


def _load(args: argparse.Namespace):
    from flyeva.config import load_config, recipe_path
    from flyeva.tasks.detect.recipe import DetectConfig

    return load_config(DetectConfig, recipe_path("detect", args.config), args.overrides)


def _exists(path: str) -> bool:
    from pathlib import Path

    return Path(path).exists()


def _run(args: argparse.Namespace) -> None:
    from flyeva.config import to_yaml

    if args.detect_command == "predict":  # `predict IMAGES... key=value...`: the overrides carry a '='
        args.overrides = [item for item in args.images if "=" in item and not _exists(item)]
        args.images = [item for item in args.images if item not in args.overrides]
    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    if args.detect_command == "train":
        from flyeva.tasks.detect.train import run_train

        summary = run_train(cfg)
    elif args.detect_command == "eval":
        from flyeva.tasks.detect.train import run_eval

        summary = {"eval": run_eval(cfg)}
    else:
        from flyeva.tasks.detect.predict import run_predict

        written = run_predict(cfg, args.images, args.out, args.threshold)
        print(f"predict: wrote {len(written)} images to {args.out}")
        return
    stats = summary.get("eval") or {}
    if stats:
        line = ", ".join(f"{kind} AP {values['AP']:.4f} AP50 {values['AP50']:.4f}"
                         for kind, values in stats.items() if isinstance(values, dict))  # fmt: skip
        print(f"detect {args.detect_command}: {line} (written to {cfg.train.output_dir}/eval.json)")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva detect ...` to the CLI."""
    detect = commands.add_parser("detect", help="detection and instance segmentation: train, eval, predict")
    tasks = detect.add_subparsers(dest="detect_command", required=True)
    for task, text in HELP.items():
        sub = tasks.add_parser(task, help=text)
        if task == "predict":
            sub.add_argument(
                "images", nargs="+", help="image files or folders, then key=value overrides (before --out)"
            )
            sub.add_argument("--out", required=True, help="folder for the drawn PNGs")
            sub.add_argument(
                "--threshold", type=float, default=0.5, help="draw detections scoring at least this"
            )
        sub.add_argument(
            "--config", default=DEFAULT_RECIPE, help="recipe name in configs/detect/ or a YAML path"
        )
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        if task != "predict":
            sub.add_argument(
                "overrides", nargs="*", help="key=value overrides, e.g. model.init=runs/pretrain/final"
            )
        sub.set_defaults(func=_run)
