"""EVA-CLIP (docs/recipes.md section 5, docs/clip.md): `flyeva clip train|zeroshot|convert|export-open-clip`.

This file stays import-light: the CLI imports it on every call.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flyeva.engine.stage import Stage, Verb, verb_output, weights_options

DATASET_HELP = (
    "TYPE:PATH[:NAME], TYPE in folder, imagenet, cifar10, cifar100, video_list, kinetics, video_folder "
    "(e.g. imagenet:/data/imagenet-a:imagenet_a); "
    "repeat for several sets; replaces the recipe's zeroshot.datasets"
)


def parse_dataset(text: str) -> dict[str, str]:
    """'imagenet:/data/in1k/val:imagenet' -> {"type": "imagenet", "path": ..., "name": ...}."""
    kind, *parts = text.split(":")
    name = parts.pop() if len(parts) >= 2 and "/" not in parts[-1] else ""
    path = ":".join(parts)
    if not kind or not path:
        raise ValueError(f"--dataset {text!r} must look like TYPE:PATH or TYPE:PATH:NAME")
    return {"type": kind, "path": path, "name": name or f"{kind}_{path.rstrip('/').rsplit('/', 1)[-1]}"}


def zeroshot_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.config import ConfigError
    from flyeva.tasks.clip.run import run_zeroshot
    from flyeva.tasks.clip.zeroshot import EvalDatasetSection, RetrievalSection

    cfg.zeroshot.checkpoint = args.weights or cfg.zeroshot.checkpoint
    output = verb_output(args, "clip", "zeroshot", cfg.zeroshot.checkpoint, cfg.train.output_dir)
    cfg.zeroshot.output = args.json or cfg.zeroshot.output or str(output / "zeroshot.json")
    weights = Path(cfg.zeroshot.checkpoint)
    inside = weights.resolve() in Path(cfg.zeroshot.output).resolve().parents
    if cfg.zeroshot.checkpoint and weights.is_dir() and inside:
        raise ConfigError(f"{cfg.zeroshot.output} is inside the weights folder {weights}; use --output DIR")
    if args.dataset:
        cfg.zeroshot.datasets = [EvalDatasetSection(**parse_dataset(text)) for text in args.dataset]
    if args.retrieval:
        cfg.zeroshot.retrieval = [RetrievalSection(path=path) for path in args.retrieval]
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


def convert_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.clip.model import save_clip

    model, section, provenance = _read(args)
    save_clip(model, section, args.out, extra={"source": provenance})
    print(f"wrote {args.out} (flyeva CLIP folder: model.safetensors + config.json)")


def export_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.clip.open_clip_export import export_open_clip

    model, section, _ = _read(args)
    export = export_open_clip(model, section, args.out)
    written = [export.weights, export.model_config, *([export.timm_folder] if export.timm_folder else [])]
    print("wrote " + ", ".join(str(path) for path in written))
    print(export.recipe)


TEXT_ACT_HELP = "text activation when the file cannot tell (EVA-CLIP: gelu; OpenAI CLIP-L text: quickgelu)"
READING_OPTIONS = (  # how to read a checkpoint whose weights cannot say everything (docs/clip.md)
    (("--text-act",), dict(choices=["gelu", "quickgelu"], help=TEXT_ACT_HELP)),
    (("--num-heads",), dict(type=int, help="vision heads, for a tower of no named size")),
    (("--text-heads",), dict(type=int, help="text heads (default: width / 64, as every CLIP)")),
)
CONVERT_ARGUMENTS = (
    (("--trust-pickle",), dict(action="store_true", help="load a file holding pickled objects")),
    *READING_OPTIONS,
)
HELP = "EVA-CLIP: training, zero-shot evaluation, conversion"
CLIP_TRAIN = Stage(
    command="clip",
    help="contrastive training (default: the miniature recipe)",
    config="flyeva.tasks.clip.config:ClipConfig",
    build="flyeva.tasks.clip.run:build_clip_train",
    check="flyeva.tasks.clip.config:check_config",
    primary="average_top1",
    verbs={
        "zeroshot": Verb(
            "zero-shot classification and retrieval of a trained CLIP",
            "flyeva.tasks.clip:zeroshot_verb",
            arguments=(
                *weights_options(
                    "a flyeva CLIP folder, a release or open_clip EVA01 file (default: the recipe's model)"
                ),
                (("--dataset",), dict(action="append", default=[], help=DATASET_HELP)),
                (("--retrieval",), dict(action="append", default=[], help="caption table or caption folder")),
                (("--json",), dict(help=argparse.SUPPRESS)),  # a file instead of OUTPUT/zeroshot.json
                *READING_OPTIONS,
            ),
        ),
        "convert": Verb(
            "an EVA-CLIP release / open_clip checkpoint -> a flyeva folder",
            "flyeva.tasks.clip:convert_verb",
            arguments=(
                (("src",), dict(help="checkpoint file (.pt/.pth/.bin/.safetensors) or flyeva CLIP folder")),
                (("--out",), dict(required=True, help="flyeva CLIP folder to write")),
                *CONVERT_ARGUMENTS,
            ),
            takes_config=False,
        ),
        "export-open-clip": Verb(
            "a CLIP -> a state dict open_clip.create_model loads",
            "flyeva.tasks.clip:export_verb",
            arguments=(
                (("src",), dict(help="flyeva CLIP folder (or any checkpoint `convert` reads)")),
                (("--out",), dict(required=True, help="file to write (.safetensors, or .pt/.bin)")),
                *CONVERT_ARGUMENTS,
            ),
            takes_config=False,
        ),
    },
)
STAGES = (CLIP_TRAIN,)
