"""The stage contract: what a task hands the engine, and the one `run_stage` every training stage runs.

A task describes each stage with a `Stage` (config class with `train` and `optim` sections, `check`,
`build(cfg) -> Built`); `run_stage` does the rest the same way for every stage, in the spirit of
torchtitan's `TrainSpec`: it takes the output folder, trains with the resolved config recorded, and
writes `final/` (and `final_ema/`) and `result.json` in the one schema `flyeva report` reads. The CLI
registers the verbs of every `Stage` it finds, so a task adds a stage without editing either.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # the CLI imports this module to register stages: it stays free of torch
    import torch
    from torch import nn

RESULT_FILE, EVAL_FILE = "result.json", "eval.json"


@runtime_checkable
class Objective(Protocol):
    """`objective(model, batch, ctx) -> (loss, metrics)`.

    `handles_backward`: the objective calls `ctx.backward(loss)` itself (CLIP's cached-feature
    accumulation runs several backwards per batch) and returns the loss for logging only.
    `input_key`: the batch entry with one row per sample (what the engine counts: "images", "clips").
    """

    handles_backward: bool
    input_key: str

    def __call__(self, model: nn.Module, batch: dict[str, Any], ctx: Any) -> tuple[torch.Tensor, dict]: ...


@runtime_checkable
class Stream(Protocol):
    """An IterableDataset whose batches carry `worker` and `index` (their ordinal within the worker),
    which makes resume exact; `num_batches` is None for a stream of unknown length."""

    def set_epoch(self, epoch: int, skip: list[int] | None = None) -> None: ...

    def num_batches(self, num_workers: int) -> int | None: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...


@runtime_checkable
class Evaluator(Protocol):
    """`evaluator(model, ctx) -> {metric: float}` on every rank (rank 0's numbers are kept);
    `details()` gives what the last evaluation found beyond the numbers (confusion, per-class IoU)."""

    def __call__(self, model: nn.Module, ctx: Any) -> dict[str, float]: ...

    def details(self) -> dict[str, Any]: ...


@dataclass
class LossObjective:
    """A plain `fn(model, batch, ctx) -> (loss, metrics)` as an `Objective` (tests, small stages)."""

    fn: Callable[..., tuple[torch.Tensor, dict]]
    handles_backward: bool = False
    input_key: str = "images"

    def __call__(self, model: nn.Module, batch: dict[str, Any], ctx: Any) -> tuple[torch.Tensor, dict]:
        return self.fn(model, batch, ctx)


@dataclass
class MetricsEvaluator:
    """A plain `fn(model, ctx) -> metrics` as an `Evaluator` with no details."""

    fn: Callable[..., dict[str, float]]

    def __call__(self, model: nn.Module, ctx: Any) -> dict[str, float]:
        return self.fn(model, ctx)

    def details(self) -> dict[str, Any]:
        return {}


def as_objective(objective: Any) -> Objective:
    return objective if isinstance(objective, Objective) else LossObjective(objective)


def as_evaluator(evaluator: Any) -> Evaluator | None:
    if evaluator is None or isinstance(evaluator, Evaluator):
        return evaluator
    return MetricsEvaluator(evaluator)


@dataclass
class Built:
    """What a stage's `build(cfg)` returns: everything the engine trains, and how the result is kept."""

    model: nn.Module
    objective: Objective
    stream: Stream
    # final weights: `save_final(full_state_dict, folder)` on rank 0 (also for the EMA weights); it may
    # return facts for result.json (e.g. the learned temperature)
    save_final: Callable[[dict[str, torch.Tensor], Path], dict[str, Any] | None]
    evaluator: Evaluator | None = None
    groups_fn: Callable[[nn.Module], list[dict]] | None = None
    optimizer_fn: Callable[..., torch.optim.Optimizer] | None = None
    facts: dict[str, Any] = field(default_factory=dict)  # recorded in result.json (classes, counts)


@dataclass(frozen=True)
class Verb:
    """A command of a stage other than training (`eval`, `predict`): `run(cfg, args)` prints its result.

    `config` replaces the stage's config class for this verb; `arguments` are extra argparse options
    as (flags, kwargs) pairs; `positional` is a help text when the verb takes inputs before its
    key=value overrides (images to predict on)."""

    help: str
    run: str  # "module:function", imported when the verb runs; `function(cfg, args)`
    config: str = ""  # "module:Class"; "" = the stage's
    default_recipe: str = ""
    arguments: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = ()
    positional: str = ""
    takes_config: bool = True  # False: `run(None, args)` with the verb's own arguments only (convert)


OUTPUT_HELP = "folder for the results (default runs/TASK_VERB/WEIGHTS_NAME; never inside the weights folder)"


def weights_options(weights_help: str) -> tuple[tuple[tuple[str, ...], dict[str, Any]], ...]:
    """`--weights` and `--output` of every eval, predict and zeroshot verb; `--checkpoint`, `--out` hidden."""
    return (
        (("--weights",), dict(help=weights_help)),
        (("--checkpoint",), dict(dest="weights", help=argparse.SUPPRESS)),
        (("--output",), dict(help=OUTPUT_HELP)),
        (("--out",), dict(dest="output", help=argparse.SUPPRESS)),
    )


def weights_name(weights: str) -> str:
    """A verb's default output folder name: `runs/miniature_detect/final` -> miniature_detect_final."""
    path = Path(weights.rstrip("/")) if weights else None
    if path is None:
        return "recipe_model"
    if path.name in ("final", "final_ema") and path.parent.name:
        return f"{path.parent.name}_{path.name}"
    return path.stem


def verb_output(args: argparse.Namespace, task: str, verb: str, weights: str, configured: str = "") -> Path:
    """Where an eval / predict / zeroshot verb writes (docs/architecture.md, "Weights and outputs of verbs").

    `--output`, else `train.output_dir=` given on the command line (`configured`), else
    runs/<task>_<verb>/<weights name>; never inside the weights folder, which stays as it was trained.
    """
    from flyeva.config import ConfigError

    given = getattr(args, "output", None)
    if not given and any(o.startswith("train.output_dir=") for o in getattr(args, "overrides", [])):
        given = configured
    out = Path(given) if given else Path("runs") / f"{task}_{verb}" / weights_name(weights)
    folder = Path(weights) if weights else None
    if folder is not None and folder.is_dir() and out.resolve().is_relative_to(folder.resolve()):
        raise ConfigError(
            f"--output {out} is inside the weights folder {weights}; write the results elsewhere "
            f"(the default is runs/{task}_{verb}/{weights_name(weights)})"
        )
    return out


@dataclass(frozen=True)
class Stage:
    """A training stage: `flyeva COMMAND [VERB] [--config RECIPE] [key=value ...]`.

    `verb` is the training verb ("train"; "finetune" for classification; "" for a command without
    verbs, e.g. `flyeva pretrain`); `verbs` are the stage's other commands; recipes live in
    `configs/<command>/`; `primary` is the metric that picks the best evaluation (higher is better).
    """

    command: str
    help: str
    config: str  # "module:Class", imported when a verb runs (the CLI imports stages on every call)
    build: str  # "module:function", `build(cfg) -> Built`
    check: str = ""  # "module:function", `check(cfg)` raises ConfigError before any work
    prepare: str = ""  # "module:function", `prepare(cfg)` run by the CLI before training (a teacher)
    verb: str = "train"
    default_recipe: str = "miniature"
    primary: str = ""
    verbs: Mapping[str, Verb] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The command line that trains it: "detect", "classify finetune", "pretrain"."""
        return " ".join(filter(None, (self.command, "" if self.verb == "train" else self.verb)))


def resolve(reference: str) -> Any:
    """The object a "module:name" reference names."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def evaluation_records(history: list[dict[str, Any]], epochs: list[int]) -> list[dict[str, Any]]:
    """The engine's evaluation entries as flat records: step, epoch, then each metric."""
    return [
        {"step": entry["step"], "epoch": epoch, **entry["eval"]}
        for entry, epoch in zip([h for h in history if "eval" in h], epochs)
    ]


def _best(records: list[dict[str, Any]], primary: str) -> dict[str, Any] | None:
    scored = [r for r in records if isinstance(r.get(primary), (int, float)) and math.isfinite(r[primary])]
    return max(scored, key=lambda r: r[primary]) if scored else None


def result_record(
    stage: str,
    verb: str,
    *,
    evaluations: list[dict[str, Any]],
    primary: str = "",
    step: int | None = None,
    run_id: str | None = None,
    weights: str | None = None,
    counts: dict[str, int] | None = None,
    facts: dict[str, Any] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The one result schema of every stage and verb (result.json of a training run, eval.json of an
    evaluation): docs/architecture.md lists its keys."""
    final = evaluations[-1] if evaluations else None
    return {
        "stage": stage,
        "verb": verb,
        "run_id": run_id,
        "step": step,
        "metrics": {k: v for k, v in (final or {}).items() if k not in ("step", "epoch")},
        "final": final,
        "best": _best(evaluations, primary),  # None without a primary metric
        "best_ema": _best(evaluations, f"ema_{primary}"),
        "evaluations": evaluations,
        "weights": weights,
        "counts": counts or {},
        "facts": facts or {},
        "details": details or {},
    }


def write_result(folder: Path, record: dict[str, Any], name: str = RESULT_FILE) -> Path:
    """Write the record atomically (a reader never sees half a file)."""
    path, tmp = folder / name, folder / f"{name}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as error:
        from flyeva.config import ConfigError

        tmp.unlink(missing_ok=True)
        raise ConfigError(
            f"could not write {path} ({error.strerror}); free space there and run the same command again"
        ) from None
    return path


def write_evaluation(
    folder: Path, stage: str, metrics: dict[str, float], *, weights: str, **extra: Any
) -> dict[str, Any]:
    """OUTPUT/eval.json of an evaluation without training (rank 0), in the result schema."""
    record = result_record(stage, "eval", evaluations=[metrics], weights=weights, **extra)
    write_result(folder, record, EVAL_FILE)
    return record


def run_stage(stage: Stage, cfg: Any) -> dict[str, Any]:
    """Train `stage` with `cfg` on the shared engine; returns the result record (empty on ranks > 0)."""
    from flyeva.config import to_dict
    from flyeva.engine import distributed as D
    from flyeva.engine.checkpoint import full_model_state
    from flyeva.engine.loop import train
    from flyeva.engine.run import RunLock

    cfg = copy.deepcopy(cfg)  # build may resolve values (config.yaml records what ran); the caller's stays
    if stage.check:
        resolve(stage.check)(cfg)
    cfg.train.check()
    D.init_distributed(cfg.train.device)
    folder = Path(cfg.train.output_dir)
    # The folder is this run's before anything is written into it (data exports, config.yaml).
    with RunLock.hold(folder, enabled=D.is_main()):
        built: Built = resolve(stage.build)(cfg)
        evaluator = as_evaluator(built.evaluator)
        result = train(
            built.model,
            built.objective,
            built.stream,
            cfg.train,
            cfg.optim,
            groups_fn=built.groups_fn,
            evaluate=evaluator,
            optimizer_fn=built.optimizer_fn,
            run_config=to_dict(cfg),
        )
        state = full_model_state(result.model)  # collective under FSDP2
        if not D.is_main():
            return {}
        saved = built.save_final(state, folder / "final")
        facts = {**built.facts, **(saved if isinstance(saved, dict) else {})}
        if result.ema_model is not None:
            built.save_final(full_model_state(result.ema_model), folder / "final_ema")
        record = result_record(
            stage.name,
            "train",
            evaluations=evaluation_records(result.history, result.eval_epochs),
            primary=stage.primary,
            step=result.step,
            run_id=result.run_id,
            weights=str(folder / "final"),
            counts={"skipped_samples": result.skipped_images, "nonfinite_steps": result.nonfinite_steps},
            facts=facts,
            details=evaluator.details() if evaluator is not None else {},
        )
        write_result(folder, record)
    return record
