"""EVA-CLIP (EVA_SPEC section 4): contrastive training from an EVA encoder, and zero-shot evaluation.

    flyeva clip train [--config NAME|FILE] [key=value ...]         # default recipe: miniature
    flyeva clip zeroshot --checkpoint RUN/final --dataset imagenet:/data/in1k/val [--dataset ...]

Modules: `model` (EvaClip, tower initialisation, optimiser groups), `loss` (all-gathered ClipLoss
and the cached-feature accumulation objective), `datasets` (local evaluation sets), `zeroshot`
(classifier, accuracy, robustness gap, retrieval), `recipe` (config schema and runs). This file
stays import-light: the CLI imports it on every call.
"""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "miniature"  # runs on 2 CPU cores in about a minute
DATASET_HELP = (
    "TYPE:PATH[:NAME], TYPE in folder, imagenet, cifar10, cifar100 "
    "(e.g. imagenet:/data/imagenet-a:imagenet_a); "
    "repeat for several sets; replaces the recipe's zeroshot.datasets"
)


def _load(args: argparse.Namespace) -> object:
    from flyeva.config import load_config, recipe_path
    from flyeva.tasks.clip.recipe import ClipConfig

    return load_config(ClipConfig, recipe_path("clip", args.config), args.overrides)


def _train(args: argparse.Namespace) -> None:
    from flyeva.config import to_yaml
    from flyeva.tasks.clip.recipe import run_clip_train

    cfg = _load(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    result = run_clip_train(cfg)
    print(f"CLIP training finished at step {result.step}; weights in {cfg.train.output_dir}/final")


def parse_dataset(text: str) -> dict[str, str]:
    """'imagenet:/data/in1k/val:imagenet' -> {"type": "imagenet", "path": ..., "name": ...}."""
    kind, *parts = text.split(":")
    name = parts.pop() if len(parts) >= 2 and "/" not in parts[-1] else ""
    path = ":".join(parts)
    if not kind or not path:
        raise ValueError(f"--dataset {text!r} must look like TYPE:PATH or TYPE:PATH:NAME")
    return {"type": kind, "path": path, "name": name or f"{kind}_{path.rstrip('/').rsplit('/', 1)[-1]}"}


def _zeroshot(args: argparse.Namespace) -> None:
    from flyeva.tasks.clip.recipe import run_zeroshot
    from flyeva.tasks.clip.zeroshot import EvalDatasetSection, RetrievalSection

    cfg = _load(args)
    if args.checkpoint:
        cfg.zeroshot.checkpoint = args.checkpoint
    if args.dataset:
        cfg.zeroshot.datasets = [EvalDatasetSection(**parse_dataset(text)) for text in args.dataset]
    if args.retrieval:
        cfg.zeroshot.retrieval = [RetrievalSection(path=path) for path in args.retrieval]
    if args.json:
        cfg.zeroshot.output = args.json
    run_zeroshot(cfg)


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva clip train|zeroshot` to the CLI."""
    clip = commands.add_parser("clip", help="EVA-CLIP: contrastive training and zero-shot evaluation")
    actions = clip.add_subparsers(dest="clip_command", required=True)

    train = actions.add_parser("train", help="contrastive training (default: the miniature recipe)")
    train.add_argument("--config", default=DEFAULT_RECIPE, help="recipe name (configs/clip) or YAML path")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    train.set_defaults(func=_train)

    zeroshot = actions.add_parser("zeroshot", help="zero-shot classification and retrieval of a trained CLIP")
    zeroshot.add_argument("--config", default=DEFAULT_RECIPE, help="recipe whose zeroshot section to use")
    zeroshot.add_argument("--checkpoint", help="a `flyeva clip train` OUTPUT/final folder")
    zeroshot.add_argument("--dataset", action="append", default=[], help=DATASET_HELP)
    zeroshot.add_argument("--retrieval", action="append", default=[], help="caption table or caption folder")
    zeroshot.add_argument("--json", help="where to write the results (default: CHECKPOINT/zeroshot.json)")
    zeroshot.add_argument("overrides", nargs="*", help="key=value overrides, e.g. zeroshot.batch_size=64")
    zeroshot.set_defaults(func=_zeroshot)
