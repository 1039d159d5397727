"""The markdown summary of runs: results per run, the plots, and config differences.

Every number in it is read from the run folder: metrics.jsonl (train / eval / epoch records),
result.json (the run's result record, the same schema for every stage) and config.yaml (the resolved config).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flyeva.engine import run as engine_run
from flyeva.tasks.report.plots import Plot, plot_runs
from flyeva.tasks.report.runs import RunLog, read_run, unique_names

REPORT_FILE = "report.md"
flatten = functools.partial(engine_run.flatten, keep_empty=True)  # a `{}` section is a value to compare


@dataclass
class Report:
    markdown: Path
    plots: list[Path]
    facts: dict[str, dict[str, Any]]  # run name -> fact -> value (what the results table shows)


def run_facts(run: RunLog) -> dict[str, Any]:
    """The results of one run, each read from its log or result.json (None where the run has none)."""
    _, losses = run.series("loss")
    _, rates = run.series("steps_per_s")
    times = [
        r["time"] for r in (*run.train, *run.evals, *run.epochs) if isinstance(r.get("time"), (int, float))
    ]
    final_eval = dict(run.summary.get("metrics") or {})  # the evaluation at the run's last step
    for record in run.evals if not final_eval else ():  # a run that stopped early: the latest of each
        final_eval.update({k: v for k, v in record.items() if k not in ("kind", "step", "time")})
    return {
        "steps": max((r["step"] for r in run.train), default=0),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "lowest_loss": min(losses) if losses else None,
        "final_lr": run.series("lr")[1][-1] if run.series("lr")[1] else None,
        "wall_s": max(times) - min(times) if times else None,
        "mean_steps_per_s": sum(rates) / len(rates) if rates else None,
        "images": sum(r.get("images", 0) for r in run.epochs),
        "skipped_inputs": sum(r.get("skipped_images", 0) for r in run.epochs),
        "skipped_steps_logged": sum(1 for r in run.train if r.get("skipped") or r.get("loss") is None),
        "nonfinite_steps": (run.summary.get("counts") or {}).get("nonfinite_steps"),
        **{f"eval {k}": v for k, v in sorted(final_eval.items())},
    }


FACT_LABELS = {
    "steps": "optimizer steps",
    "first_loss": "loss, first logged",
    "final_loss": "loss, last logged",
    "lowest_loss": "loss, lowest logged",
    "final_lr": "learning rate, last logged",
    "wall_s": "wall time, first to last record (s)",
    "mean_steps_per_s": "throughput, mean (steps/s)",
    "images": "images seen (epoch records)",
    "skipped_inputs": "unreadable inputs skipped",
    "skipped_steps_logged": "skipped steps in the log (null loss)",
    "nonfinite_steps": "non-finite steps (result.json)",
}


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_recipe(recipe: str | Path) -> tuple[str, dict[str, Any]]:
    """(label, values) of a recipe `TASK/NAME` or YAML file, with its `base:` chain merged under it."""
    from flyeva.config import recipe_path

    text = str(recipe)
    path = Path(text) if Path(text).is_file() else recipe_path(*text.split("/", 1)) if "/" in text else None
    if path is None:
        raise ValueError(f"--recipe {text!r} is neither a YAML file nor TASK/NAME (e.g. clip/miniature)")
    values = yaml.safe_load(path.read_text()) or {}
    base = values.pop("base", None)
    if base is not None:  # a recipe holds what differs from its base (a sibling file)
        _, below = read_recipe(path.parent / f"{str(base).removesuffix('.yaml')}.yaml")
        values = {**flatten(below), **flatten(values)}
    return text, flatten(values)


def same(recipe_value: Any, run_value: Any) -> bool:
    """Equal where the recipe says something: a recipe's list item lists only some of a source's keys."""
    if isinstance(recipe_value, dict) and isinstance(run_value, dict):
        return all(k in run_value and same(v, run_value[k]) for k, v in recipe_value.items())
    if isinstance(recipe_value, list) and isinstance(run_value, list) and len(recipe_value) == len(run_value):
        return all(same(a, b) for a, b in zip(recipe_value, run_value, strict=True))
    return recipe_value == run_value


def config_rows(runs: list[RunLog], recipe: tuple[str, dict[str, Any]] | None) -> tuple[str, list[list[str]]]:
    """Keys whose values differ: from the recipe (keys it sets) when given, else from the first run."""
    configs = [flatten(run.config) for run in runs]
    if recipe is not None:
        label, reference = recipe
        keys = [k for k in reference if any(not same(reference[k], c.get(k, "(absent)")) for c in configs)]
    else:
        label, reference = f"run {runs[0].name}", configs[0]
        keys = sorted({k for c in configs for k in c if any(c.get(k) != configs[0].get(k) for c in configs)})
    rows = [[f"`{k}`", fmt(reference.get(k)), *(fmt(c.get(k, "(absent)")) for c in configs)] for k in keys]
    return label, rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render(runs: list[RunLog], facts: dict[str, dict[str, Any]], plots: list[Plot], out_dir: Path,
           recipe: tuple[str, dict[str, Any]] | None) -> str:  # fmt: skip
    names = [run.name for run in runs]
    lines = [
        "# Training report",
        "",
        "Runs: " + ", ".join(f"`{run.name}` ({run.folder})" for run in runs),
        "",
    ]
    keys = list(dict.fromkeys(k for f in facts.values() for k in f))
    rows = [[FACT_LABELS.get(k, k), *(fmt(facts[n].get(k)) for n in names)] for k in keys]
    lines += ["## Results", "", *table(["", *names], rows), ""]
    lines += ["## Plots", "", *(f"![{p.path.stem}]({p.path.relative_to(out_dir)})" for p in plots), ""]
    label, diff = config_rows(runs, recipe)
    lines += [f"## Config against {label}", ""]
    if len(runs) == 1 and recipe is None:
        lines += [
            "One run and no recipe: pass `--recipe TASK/NAME` to compare with the recipe it started from.",
            "",
        ]
    elif diff:
        lines += [*table(["key", label, *names], diff), ""]
    else:
        lines += ["No differences.", ""]
    unreadable = [f"{run.name}: {run.unreadable_lines}" for run in runs if run.unreadable_lines]
    if unreadable:
        lines += [f"Unreadable metrics.jsonl lines skipped: {', '.join(unreadable)}.", ""]
    return "\n".join(lines)


def make_report(
    run_dirs: list[str | Path], out_dir: str | Path | None = None, recipe: str | None = None
) -> Report:
    """Read the runs, write their plots and `report.md` into `out_dir` (default FIRST_RUN/report)."""
    folders = [Path(d) for d in run_dirs]
    runs = [read_run(folder, name) for folder, name in zip(folders, unique_names(folders), strict=True)]
    out = Path(out_dir) if out_dir else folders[0] / "report"
    if recipe is None:  # a run whose config names its recipe is compared with it
        named = runs[0].config.get("recipe")
        recipe = named if isinstance(named, str) and named else None
    plots = plot_runs(runs, out)
    facts = {run.name: run_facts(run) for run in runs}
    markdown = out / REPORT_FILE
    markdown.write_text(render(runs, facts, plots, out, read_recipe(recipe) if recipe else None))
    return Report(markdown, [p.path for p in plots], facts)
