"""`flyeva <command> [--config FILE] [key=value ...]`: one entry point for every stage."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import pkgutil
import sys
from pathlib import Path

from flyeva.config import ConfigError

# Packages whose `STAGES` (training stages and their verbs) or `register(commands)` the CLI adds; every
# package under flyeva/tasks/ is found without being named here.
COMMAND_PACKAGES = ("flyeva.pretrain",)


def _load_stage_config(config_ref: str, recipes: str, args: argparse.Namespace):
    from flyeva.config import load_config, recipe_path
    from flyeva.engine.stage import resolve

    return load_config(resolve(config_ref), recipe_path(recipes, args.config), args.overrides)


def _split_inputs(args: argparse.Namespace) -> None:
    """`predict IMAGES... key=value...`: overrides carry a '=' and are not existing paths."""
    items = args.inputs
    args.overrides = [item for item in items if "=" in item and not Path(item).exists()]
    args.inputs = [item for item in items if item not in args.overrides]


def _train(stage, args: argparse.Namespace) -> None:
    from flyeva.config import to_yaml
    from flyeva.engine.stage import resolve, run_stage
    from flyeva.tasks.report import report_hint

    cfg = _load_stage_config(stage.config, stage.command, args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    if stage.prepare:  # e.g. a teacher trained for minutes: only once every value has been checked
        if stage.check:
            resolve(stage.check)(cfg)
        resolve(stage.prepare)(cfg)
    record = run_stage(stage, cfg)
    if not record:  # ranks other than 0
        return
    line = f"{stage.name}: finished at step {record['step']}"
    if stage.primary and record["final"]:
        line += f"; {stage.primary} {record['metrics'].get(stage.primary, float('nan')):.4f} at the last step"
        if record["best"]:
            line += f" (best {record['best'][stage.primary]:.4f} at step {record['best']['step']})"
    print(f"{line}; weights in {record['weights']}")
    print(report_hint(cfg.train.output_dir))


def _verb(stage, verb, args: argparse.Namespace) -> None:
    from flyeva.config import to_yaml
    from flyeva.engine.stage import resolve

    if not verb.takes_config:
        resolve(verb.run)(None, args)
        return
    if verb.positional:
        _split_inputs(args)
    cfg = _load_stage_config(verb.config or stage.config, stage.command, args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return
    resolve(verb.run)(cfg, args)


def _common_arguments(parser: argparse.ArgumentParser, recipes: str, default: str, positional: str) -> None:
    parser.add_argument("--config", default=default, help=f"recipe name in configs/{recipes}/ or a YAML path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    if positional:
        parser.add_argument("inputs", nargs="+", help=f"{positional}, then key=value overrides")
    else:
        parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1")


def add_stages(commands: argparse._SubParsersAction, help_text: str, stages) -> None:
    """Register `flyeva COMMAND VERB ...` for every stage and verb, the same way for all of them."""
    first = stages[0]
    parser = commands.add_parser(first.command, help=help_text)
    if len(stages) == 1 and not first.verb:  # a command without verbs: `flyeva pretrain`
        _common_arguments(parser, first.command, first.default_recipe, "")
        parser.set_defaults(func=functools.partial(_train, first))
        return
    verbs = parser.add_subparsers(dest=f"{first.command}_verb", required=True)
    for stage in stages:
        sub = verbs.add_parser(stage.verb, help=stage.help)
        _common_arguments(sub, stage.command, stage.default_recipe, "")
        sub.set_defaults(func=functools.partial(_train, stage))
        for name, verb in stage.verbs.items():
            sub = verbs.add_parser(name, help=verb.help)
            if verb.takes_config:
                default = verb.default_recipe or stage.default_recipe
                _common_arguments(sub, stage.command, default, verb.positional)
            for flags, kwargs in verb.arguments:
                sub.add_argument(*flags, **kwargs)
            sub.set_defaults(func=functools.partial(_verb, stage, verb))


def _command_packages() -> list[str]:
    import flyeva.tasks

    found = [f"flyeva.tasks.{m.name}" for m in pkgutil.iter_modules(flyeva.tasks.__path__) if m.ispkg]
    return [*COMMAND_PACKAGES, *sorted(found)]


def _models(args: argparse.Namespace) -> None:
    import torch

    from flyeva.models.eva import EVA_SIZES, build_mim_model, count_parameters, encoder_flops

    header = f"{'name':<10} {'img':>4} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} {'MLP':>5}"
    print(f"{header} {'encoder params':>15} {'MIM params':>14} {'GFLOPs/img':>10}")
    for name, size in EVA_SIZES.items():
        with torch.device("meta"):  # count without allocating (EVA-g would take 4 GB)
            mim = build_mim_model(size, release_init=False)
        total = count_parameters(mim)
        encoder = total - mim.mask_token.numel() - count_parameters(mim.lm_head)
        print(
            f"{name:<10} {size.img_size:>4} {size.patch_size:>5} {size.embed_dim:>5} {size.depth:>5} "
            f"{size.num_heads:>5} {size.mlp_dim:>5} {encoder:>15,} {total:>14,} "
            f"{encoder_flops(size) / 1e9:>10.2f}"
        )
    print("MIM params include the [MASK] token and a 768-d lm_head; GFLOPs = 2 x multiply-adds, one forward.")


def _convert(args: argparse.Namespace) -> None:
    from flyeva.models import checkpoint as ckpt

    if args.what == "teacher":
        from flyeva.teachers import convert_openai_torchscript

        print(f"wrote {convert_openai_torchscript(args.openai_torchscript, args.out)}")
        return
    if args.what == "release":
        from flyeva.tasks.video.convert import convert_release_video

        video = convert_release_video(args.src, args.out, args.num_heads, args.trust_pickle)
        if video is not None:  # a Conv3d patch kernel: the release's video models
            print(f"wrote {video} (a video model)")
            return
        model = ckpt.load_release_checkpoint(
            args.src, kind=args.kind, num_heads=args.num_heads, trust_pickle=args.trust_pickle
        )
        print(f"wrote {ckpt.save_flyeva(model, args.out)}")
        return
    model = ckpt.load_any(args.src, kind=args.kind, trust_pickle=args.trust_pickle)
    if args.what == "to-release":
        print(f"wrote {ckpt.export_release(model, args.out)}")
    else:
        path = ckpt.export_timm(model, args.out)
        print(f"wrote {path}; load it with:\n  {ckpt.timm_recipe(ckpt.named_size(model), path)}")


def _shapeworld_export(args: argparse.Namespace) -> None:
    from flyeva.data.export import FORMATS, export_split
    from flyeva.data.synthetic import ShapeWorld

    formats = tuple(args.formats.split(",")) if args.formats else FORMATS  # export_split checks them
    world = ShapeWorld(image_size=args.image_size, seed=args.seed)
    written = export_split(world, args.out, args.num, formats=formats, start_index=args.start)
    for name, path in written.items():
        print(f"{name:<12} {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flyeva", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="list named sizes with parameter counts and GFLOPs")
    models.set_defaults(func=_models)

    convert = commands.add_parser("convert", help="convert weights between release, flyeva and timm formats")
    kinds = convert.add_subparsers(dest="what", required=True)
    for name, help_text in (
        ("release", "a release checkpoint -> flyeva folder"),
        ("to-timm", "a flyeva folder or release checkpoint -> a timm-loadable safetensors file"),
        ("to-release", "a flyeva folder or release checkpoint -> the release's {'model': state_dict} file"),
    ):
        sub = kinds.add_parser(name, help=help_text)
        sub.add_argument("src")
        if name == "release":
            sub.add_argument(
                "--num-heads", type=int, default=None, help="only for sizes not in `flyeva models`"
            )
        sub.add_argument("--out", required=True)
        sub.add_argument("--kind", choices=("mim", "encoder"), default="mim")
        sub.add_argument(
            "--trust-pickle",
            action="store_true",
            help="unpickle arbitrary objects (runs code): only for files you trust, once",
        )
    teacher = kinds.add_parser("teacher", help="OpenAI CLIP TorchScript archive -> teacher folder (one time)")
    teacher.add_argument("--openai-torchscript", required=True, help="e.g. ViT-L-14.pt from OpenAI")
    teacher.add_argument("--out", required=True, help="folder to write (model.safetensors + config.json)")
    convert.set_defaults(func=_convert)

    shapeworld = commands.add_parser("shapeworld", help="the synthetic miniature world")
    shapeworld_commands = shapeworld.add_subparsers(dest="what", required=True)
    export = shapeworld_commands.add_parser("export", help="write a split in the real formats flyeva reads")
    export.add_argument("--out", required=True)
    export.add_argument("--num", type=int, default=1000, help="number of samples")
    export.add_argument("--start", type=int, default=0, help="first sample index (val: a disjoint range)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--image-size", type=int, default=64)
    export.add_argument("--formats", default="", help="comma list of imagefolder,wds,coco,semantic,video")
    export.set_defaults(func=_shapeworld_export)
    for name in _command_packages():
        module = importlib.import_module(name)
        if hasattr(module, "STAGES"):
            add_stages(commands, module.HELP, module.STAGES)
        elif hasattr(module, "register"):
            module.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    from flyeva.engine.checkpoint import CheckpointWriteError
    from flyeva.engine.loop import TrainingDiverged
    from flyeva.engine.preemption import Interrupted

    try:
        args.func(args)
    except Interrupted as stop:  # SIGTERM / Ctrl-C: a checkpoint was written; the conventional 128 + N
        print(f"flyeva: {stop}", file=sys.stderr)
        return stop.exit_code
    except TrainingDiverged as error:
        print(f"flyeva: training diverged: {error}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError, CheckpointWriteError) as error:
        if args.verbose:
            raise  # the full traceback, for bug reports
        print(f"flyeva: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
