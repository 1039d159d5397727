"""`flyeva demo`: the miniature world, EVA's whole pipeline on 2 CPU cores (import-light)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> None:
    from flyeva.tasks.demo.pipeline import run_demo

    out = args.out or ("runs/demo_quick" if args.quick else "runs/demo")
    stages = ("core", "detect", "segment", "video") if args.stages == "all" else tuple(args.stages.split(","))
    report = run_demo(out, quick=args.quick, stages=stages)
    print(f"report: {report}")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva demo` to the CLI."""
    demo = commands.add_parser("demo", help="EVA's whole pipeline in the miniature world (ShapeWorld)")
    demo.add_argument("--quick", action="store_true", help="a smoke run under a minute (tiny budgets)")
    demo.add_argument(
        "--stages",
        default="core",
        help="comma list of core (teacher, MIM, classification, CLIP), detect, segment, video, ablation "
        "(the paper's pilot study: MIM vs feature distillation); all = core and the three tasks",
    )
    demo.add_argument("--out", default=None, help="output folder (default runs/demo or runs/demo_quick)")
    demo.set_defaults(func=_run)
