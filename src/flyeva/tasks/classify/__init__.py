"""Image classification transfer (docs/recipes.md §4): `flyeva classify finetune|linprobe|knn|eval`.

Import-light: the CLI imports it to register the commands; torch and timm load when a verb runs."""

from __future__ import annotations

import argparse
import json

from flyeva.engine.stage import Stage, Verb, verb_output, weights_options

HELP = "image classification: finetune, linprobe, knn, eval, predict, export-timm"
WEIGHTS_HELP = "classifier folder (OUTPUT/final of `classify finetune`) or release fine-tuned checkpoint"
FINETUNE = Stage(
    command="classify",
    verb="finetune",
    help="fine-tune a pretrained encoder with layer-wise lr decay (default: the miniature recipe)",
    config="flyeva.tasks.classify.finetune:FinetuneConfig",
    build="flyeva.tasks.classify.finetune:build_finetune",
    primary="top1",
    verbs={
        "knn": Verb(
            "weighted kNN (k=20, T=0.07, cosine) on frozen features",
            "flyeva.tasks.classify.knn:knn_verb",
            config="flyeva.tasks.classify.knn:KnnConfig",
            default_recipe="miniature_knn",
        ),
        "eval": Verb(
            "top-1/top-5 of a classifier folder or release fine-tuned checkpoint",
            "flyeva.tasks.classify:eval_verb",
            config="flyeva.tasks.classify.evaluate:ClassifyEvalConfig",
            default_recipe="miniature_eval",
            arguments=(
                *weights_options(WEIGHTS_HELP),
                (("--num-heads",), dict(type=int, default=0, help="only for sizes not in `flyeva models`")),
            ),
        ),
        "predict": Verb(
            "the top-k classes of each image -> OUTPUT/predictions.json and a printed table",
            "flyeva.tasks.classify:predict_verb",
            takes_config=False,
            arguments=(
                (("images",), dict(nargs="+", help="image files or folders")),
                *weights_options("classifier folder (OUTPUT/final of `classify finetune`)"),
                (("--top-k",), dict(type=int, default=5, help="classes listed per image")),
            ),
        ),
        "export-timm": Verb(
            "a fine-tuned classifier folder -> a timm-loadable safetensors",
            "flyeva.tasks.classify:export_verb",
            arguments=(
                (("src",), dict(help="the `final` (or `final_ema`) folder of `flyeva classify finetune`")),
                (("--out",), dict(required=True)),
            ),
            takes_config=False,
        ),
    },
)
LINPROBE = Stage(
    command="classify",
    verb="linprobe",
    help="train a linear probe (BatchNorm + Linear) on a frozen encoder, features cached",
    config="flyeva.tasks.classify.probe:LinprobeConfig",
    build="flyeva.tasks.classify.probe:build_linprobe",
    check="flyeva.tasks.classify.probe:check_linprobe",
    default_recipe="miniature_linprobe",
    primary="top1",
)
STAGES = (FINETUNE, LINPROBE)


def eval_verb(cfg, args: argparse.Namespace) -> None:
    """`flyeva classify eval`: one JSON line of the numbers; OUTPUT/eval.json holds the record."""
    from flyeva.engine import distributed as D
    from flyeva.engine.run import RunLock
    from flyeva.tasks.classify.evaluate import run_classify_eval

    cfg.model.checkpoint = args.weights or cfg.model.checkpoint
    cfg.model.num_heads = args.num_heads or cfg.model.num_heads
    output = verb_output(args, "classify", "eval", cfg.model.checkpoint, cfg.train.output_dir)
    cfg.train.output_dir = str(output)
    with RunLock.hold(output, enabled=D.is_main()):
        record = run_classify_eval(cfg)
    if record:
        print(json.dumps({**record["metrics"], **record["facts"]}))
        print(f"written to {output / 'eval.json'}")


def predict_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.classify.predict import run_predict

    if not args.weights:
        raise ValueError(
            "classify predict: pass --weights FOLDER (OUTPUT/final of `flyeva classify finetune`)"
        )
    output = verb_output(args, "classify", "predict", args.weights)
    path = run_predict(args.weights, args.images, output, args.top_k)
    print(f"written to {path}")


def export_verb(cfg, args: argparse.Namespace) -> None:
    from flyeva.tasks.classify.model import export_timm_classifier, load_classifier

    model, _ = load_classifier(args.src)
    path, recipe = export_timm_classifier(model, args.out)
    print(f"wrote {path}; load it with:\n  {recipe}")
