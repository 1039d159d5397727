"""PNG plots of runs, overlaid: loss, learning rate, gradient norm, throughput, evaluation metrics.

matplotlib's object API on the Agg canvas (`Figure.savefig`): no display and no pyplot global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from flyeva.tasks.report.runs import RunLog

# (record key, file stem, y-axis label) of the per-step plots.
TRAIN_PLOTS = (
    ("loss", "loss", "training loss"),
    ("lr", "lr", "learning rate (base, before lr_scale)"),
    ("grad_norm", "grad_norm", "gradient norm (before clipping)"),
    ("steps_per_s", "throughput", "optimizer steps / s"),
)
MAX_EVAL_PANELS = 9  # evaluation metrics beyond this many are in the summary only


@dataclass
class Plot:
    """A written PNG and what it shows: run name -> metric -> (steps, values)."""

    path: Path
    series: dict[str, dict[str, tuple[list[int], list[float]]]] = field(default_factory=dict)


def _figure(panels: int = 1):
    from matplotlib.figure import Figure

    columns = min(3, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(6 * columns, 3.6 * rows), layout="constrained")
    return figure, [figure.add_subplot(rows, columns, i + 1) for i in range(panels)]


def plot_train_metric(runs: list[RunLog], key: str, label: str, path: Path) -> Plot | None:
    """One line per run; a skipped step (null loss) is a gap and a dotted mark. None if no run has `key`."""
    plot = Plot(path)
    figure, (axes,) = _figure()
    for run in runs:
        steps, values = run.series(key)
        if not steps:
            continue
        plot.series[run.name] = {key: (steps, values)}
        (line,) = axes.plot(steps, values, label=run.name, linewidth=1.2)
        if key == "loss":
            for record in run.train:
                if record.get("skipped") or record.get("loss") is None:
                    axes.axvline(record["step"], color=line.get_color(), linestyle=":", alpha=0.7)
    if not plot.series:
        return None
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return plot


def plot_evaluations(runs: list[RunLog], path: Path) -> Plot | None:
    """One panel per evaluation metric (first MAX_EVAL_PANELS by name), runs overlaid."""
    keys = sorted({key for run in runs for key in run.eval_keys()})[:MAX_EVAL_PANELS]
    if not keys:
        return None
    plot = Plot(path)
    figure, panels = _figure(len(keys))
    for axes, key in zip(panels, keys, strict=True):
        for run in runs:
            steps, values = run.series(key, kind="eval")
            if steps:
                plot.series.setdefault(run.name, {})[key] = (steps, values)
                axes.plot(steps, values, marker="o", label=run.name)
        axes.set_title(key, fontsize="medium")
        axes.set_xlabel("optimizer step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)
    return plot


def plot_runs(runs: list[RunLog], out_dir: Path) -> list[Plot]:
    """Every plot that has data, written into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [plot_train_metric(runs, key, label, out_dir / f"{stem}.png") for key, stem, label in TRAIN_PLOTS]
    plots.append(plot_evaluations(runs, out_dir / "eval.png"))
    return [plot for plot in plots if plot is not None]
