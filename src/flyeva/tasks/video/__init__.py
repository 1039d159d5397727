"""Video action recognition (paper section 4.2; docs/video.md): `flyeva video train|eval|zeroshot`.

Import-light on purpose: the CLI imports this package to register its commands; torch, timm and
PyAV are imported inside the handlers.
"""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "miniature"  # ShapeWorld clips (the motion is the class): minutes on 2 CPU cores


def _run(args: argparse.Namespace) -> None:
    from flyeva.config import load_config, recipe_path, to_yaml
    from flyeva.tasks.video.recipe import VideoConfig, run_eval, run_train

    cfg = load_config(VideoConfig, recipe_path("video", args.config), args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    if args.video_command == "train":
        summary = run_train(cfg)
        if summary.get("final"):
            final = summary["final"]
            print(f"video train: final top-1 {final['top1']:.2f} top-5 {final['top5']:.2f}; weights in "
                  f"{cfg.train.output_dir}/final")  # fmt: skip
        return
    report = run_eval(cfg)
    if report:
        print(
            f"video eval ({report['views']} clips x {report['crops']} crops, {report['videos']} videos, "
            f"{report['skipped_videos']} unreadable): top-1 {report['top1']:.2f} top-5 {report['top5']:.2f} "
            f"mean class {report['mean_class_top1']:.2f}; wrote {cfg.train.output_dir}/eval.json"
        )


def _zeroshot(args: argparse.Namespace) -> None:
    from flyeva.tasks.video.zeroshot import run_zeroshot_cli

    run_zeroshot_cli(args)


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva video ...` to the CLI."""
    video = commands.add_parser("video", help="video action recognition: train, eval, zeroshot")
    tasks = video.add_subparsers(dest="video_command", required=True)
    for name, help_text in (
        ("train", "fine-tune a video EVA on clips (default: the miniature recipe)"),
        ("eval", "multi-view evaluation of a trained video model; writes OUTPUT/eval.json"),
    ):
        sub = tasks.add_parser(name, help=help_text)
        sub.add_argument(
            "--config", default=DEFAULT_RECIPE, help="recipe name in configs/video/ or a YAML path"
        )
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. data.train.path=k400/train.csv"
        )
        sub.set_defaults(func=_run)
    zeroshot = tasks.add_parser("zeroshot", help="zero-shot action recognition with an EVA-CLIP folder")
    zeroshot.add_argument("--checkpoint", required=True, help="a `flyeva clip train` OUTPUT/final folder")
    zeroshot.add_argument(
        "--list", default="", help="video list (path,label / Kinetics CSV); default: ShapeWorld clips"
    )
    zeroshot.add_argument("--type", default="list", help="list | kinetics | folder")
    zeroshot.add_argument("--root", default="", help="folder the list's paths start from")
    zeroshot.add_argument("--classes", default="", help="class names, one per line")
    zeroshot.add_argument(
        "--templates", default="", help="file of prompt templates with {} (default: video prompts)"
    )
    zeroshot.add_argument("--num-frames", type=int, default=8)
    zeroshot.add_argument("--views", type=int, default=1, help="clips per video, embeddings averaged")
    zeroshot.add_argument("--decoder", default="auto")
    zeroshot.add_argument("--batch-size", type=int, default=16)
    zeroshot.add_argument(
        "--out", default="", help="JSON path (default: zeroshot_video.json in the checkpoint folder)"
    )
    zeroshot.set_defaults(func=_zeroshot)
