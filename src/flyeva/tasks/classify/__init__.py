"""Image classification transfer (docs/recipes.md §4): `flyeva classify finetune|linprobe|knn|export-timm`.

Import-light on purpose: the CLI imports this package to register its commands; torch and timm are
imported inside the handlers.
"""

from __future__ import annotations

import argparse

# The embedded defaults: each runs on a 2-core laptop in about a minute (ShapeWorld, miniature size).
DEFAULT_RECIPES = {"finetune": "miniature", "linprobe": "miniature_linprobe", "knn": "miniature_knn"}
HELP = {
    "finetune": "fine-tune a pretrained encoder with layer-wise lr decay (default: the miniature recipe)",
    "linprobe": "train a linear probe (BatchNorm + Linear, LARS) on a frozen encoder, features cached",
    "knn": "weighted kNN (k=20, T=0.07, cosine) on frozen features",
}


def _schema_and_runner(task: str):
    if task == "finetune":
        from flyeva.tasks.classify.finetune import FinetuneConfig, run_finetune

        return FinetuneConfig, run_finetune
    if task == "linprobe":
        from flyeva.tasks.classify.probe import LinprobeConfig, run_linprobe

        return LinprobeConfig, run_linprobe
    from flyeva.tasks.classify.knn import KnnConfig, run_knn

    return KnnConfig, run_knn


def _run(args: argparse.Namespace) -> None:
    from flyeva.config import load_config, recipe_path, to_yaml

    schema, runner = _schema_and_runner(args.classify_task)
    cfg = load_config(schema, recipe_path("classify", args.config), args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    summary = runner(cfg)
    if not summary:  # ranks other than 0
        return
    from flyeva.tasks.report import report_hint

    print(report_hint(cfg.train.output_dir))
    if "best" in summary:
        best, final = summary["best"], summary["final"]
        print(
            f"{args.classify_task}: best top-1 {best['top1']:.2f} (epoch {best['epoch']}), "
            f"final top-1 {final['top1']:.2f} top-5 {final['top5']:.2f}"
        )
    elif "top1" in summary:
        print(f"knn: top-1 {summary['top1']:.2f} top-5 {summary['top5']:.2f} (k={summary['k']})")


def _eval(args: argparse.Namespace) -> None:
    import json

    from flyeva.config import load_config, recipe_path
    from flyeva.tasks.classify.evaluate import ClassifyEvalConfig, run_classify_eval

    overrides = [f"model.checkpoint={args.checkpoint}", *args.overrides]
    if args.num_heads:
        overrides.append(f"model.num_heads={args.num_heads}")
    result = run_classify_eval(
        load_config(ClassifyEvalConfig, recipe_path("classify", args.config), overrides)
    )
    print(json.dumps({k: v for k, v in result.items() if k in ("top1", "top5", "loss", "num_classes")}))


def _export(args: argparse.Namespace) -> None:
    from flyeva.tasks.classify.model import export_timm_classifier, load_classifier

    model, _ = load_classifier(args.src)
    path, recipe = export_timm_classifier(model, args.out)
    print(f"wrote {path}; load it with:\n  {recipe}")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva classify ...` to the CLI."""
    classify = commands.add_parser(
        "classify", help="image classification: finetune, linprobe, knn, eval, export-timm"
    )
    tasks = classify.add_subparsers(dest="classify_command", required=True)
    for task, default in DEFAULT_RECIPES.items():
        sub = tasks.add_parser(task, help=HELP[task])
        sub.add_argument("--config", default=default, help="recipe name in configs/classify/ or a YAML path")
        sub.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        sub.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data/in1k")
        sub.set_defaults(func=_run, classify_task=task)
    evaluate = tasks.add_parser(
        "eval", help="top-1/top-5 of a classifier folder or release fine-tuned checkpoint"
    )
    evaluate.add_argument(
        "--checkpoint", required=True, help="flyeva classifier folder or release checkpoint"
    )
    evaluate.add_argument("--num-heads", type=int, default=0, help="only for sizes not in `flyeva models`")
    evaluate.add_argument(
        "--config", default="miniature_eval", help="recipe name in configs/classify/ or a YAML"
    )
    evaluate.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.root=/data/in1k")
    evaluate.set_defaults(func=_eval)
    export = tasks.add_parser(
        "export-timm", help="a fine-tuned classifier folder -> a timm-loadable safetensors"
    )
    export.add_argument("src", help="the `final` (or `final_ema`) folder of `flyeva classify finetune`")
    export.add_argument("--out", required=True)
    export.set_defaults(func=_export)
