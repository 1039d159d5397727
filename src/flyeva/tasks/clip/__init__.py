"""EVA-CLIP (docs/recipes.md section 5): contrastive training from an EVA encoder, zero-shot evaluation,
and weights in and out (the release's EVA-CLIP checkpoints, open_clip).

    flyeva clip train [--config NAME|FILE] [key=value ...]         # default recipe: miniature
    flyeva clip zeroshot --checkpoint RUN/final|RELEASE.pt|OPEN_CLIP.bin --dataset imagenet:/data/in1k/val
    flyeva clip convert EVA_CLIP_RELEASE.pt --out DIR [--text-act gelu|quickgelu]
    flyeva clip export-open-clip RUN/final --out eva_clip.safetensors

Modules: `model` (EvaClip, optimiser groups, save/load), `init_weights` (towers from EVA / open_clip
files), `loss` (all-gathered ClipLoss and the cached-feature accumulation objective), `datasets`
(local evaluation sets), `zeroshot` (classifier, accuracy, robustness gap, retrieval), `recipe`
(config schema and runs), `convert` (release / open_clip checkpoints -> EvaClip), `open_clip_export`.
This file stays import-light: the CLI imports it on every call.
"""

from __future__ import annotations

import argparse

DEFAULT_RECIPE = "miniature"  # runs on 2 CPU cores in about a minute
DATASET_HELP = (
    "TYPE:PATH[:NAME], TYPE in folder, imagenet, cifar10, cifar100, video_list, kinetics, video_folder "
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
    from flyeva.tasks.report import report_hint

    print(report_hint(cfg.train.output_dir))


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
    run_zeroshot(cfg, **_reading_options(args))


def _reading_options(args: argparse.Namespace) -> dict[str, object]:
    return {"text_act": args.text_act, "num_heads": args.num_heads, "text_heads": args.text_heads}


def _read(args: argparse.Namespace) -> tuple[object, object, dict]:
    from flyeva.tasks.clip.convert import load_any_clip

    model, section, provenance = load_any_clip(
        args.src, trust_pickle=args.trust_pickle, **_reading_options(args)
    )
    if provenance.get("text_activation"):
        print(
            f"{args.src}: {provenance['layout']} layout; text activation {provenance['text_activation']} "
            f"({provenance['text_activation_from']})"
        )
    return model, section, provenance


def _convert(args: argparse.Namespace) -> None:
    from flyeva.tasks.clip.model import save_clip

    model, section, provenance = _read(args)
    save_clip(model, section, args.out, extra={"source": provenance})
    print(f"wrote {args.out} (flyeva CLIP folder: model.safetensors + config.json)")


def _export_open_clip(args: argparse.Namespace) -> None:
    from flyeva.tasks.clip.open_clip_export import export_open_clip

    model, section, _ = _read(args)
    export = export_open_clip(model, section, args.out)
    written = [export.weights, export.model_config, *([export.timm_folder] if export.timm_folder else [])]
    print("wrote " + ", ".join(str(path) for path in written))
    print(export.recipe)


def _add_reading_options(parser: argparse.ArgumentParser) -> None:
    """How to read a checkpoint whose weights cannot say everything (docs/clip.md, "Weights in and out")."""
    parser.add_argument(
        "--text-act",
        choices=["gelu", "quickgelu"],
        help="text activation when the file cannot tell (EVA-CLIP: gelu; OpenAI CLIP-L text: quickgelu)",
    )
    parser.add_argument("--num-heads", type=int, help="vision heads, for a tower of no named size")
    parser.add_argument("--text-heads", type=int, help="text heads (default: width / 64, as every CLIP)")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `flyeva clip train|zeroshot|convert|export-open-clip` to the CLI."""
    clip = commands.add_parser("clip", help="EVA-CLIP: training, zero-shot evaluation, conversion")
    actions = clip.add_subparsers(dest="clip_command", required=True)

    train = actions.add_parser("train", help="contrastive training (default: the miniature recipe)")
    train.add_argument("--config", default=DEFAULT_RECIPE, help="recipe name (configs/clip) or YAML path")
    train.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")
    train.set_defaults(func=_train)

    zeroshot = actions.add_parser("zeroshot", help="zero-shot classification and retrieval of a trained CLIP")
    zeroshot.add_argument("--config", default=DEFAULT_RECIPE, help="recipe whose zeroshot section to use")
    zeroshot.add_argument(
        "--checkpoint", help="a flyeva CLIP folder, an EVA-CLIP release checkpoint or an open_clip EVA01 file"
    )
    zeroshot.add_argument("--dataset", action="append", default=[], help=DATASET_HELP)
    zeroshot.add_argument("--retrieval", action="append", default=[], help="caption table or caption folder")
    zeroshot.add_argument("--json", help="where to write the results (default: CHECKPOINT/zeroshot.json)")
    zeroshot.add_argument("overrides", nargs="*", help="key=value overrides, e.g. zeroshot.batch_size=64")
    _add_reading_options(zeroshot)
    zeroshot.set_defaults(func=_zeroshot)

    convert = actions.add_parser(
        "convert", help="an EVA-CLIP release / open_clip checkpoint -> a flyeva folder"
    )
    convert.add_argument("src", help="checkpoint file (.pt/.pth/.bin/.safetensors) or flyeva CLIP folder")
    convert.add_argument("--out", required=True, help="flyeva CLIP folder to write")
    convert.add_argument("--trust-pickle", action="store_true", help="load a file holding pickled objects")
    _add_reading_options(convert)
    convert.set_defaults(func=_convert)

    export = actions.add_parser(
        "export-open-clip", help="a CLIP -> a state dict open_clip.create_model loads"
    )
    export.add_argument("src", help="flyeva CLIP folder (or any checkpoint `convert` reads)")
    export.add_argument("--out", required=True, help="file to write (.safetensors, or .pt/.bin)")
    export.add_argument("--trust-pickle", action="store_true", help="load a file holding pickled objects")
    _add_reading_options(export)
    export.set_defaults(func=_export_open_clip)
