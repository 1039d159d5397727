"""The demo's report: a markdown table over seeds (mean and spread) and PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path


def read_losses(metrics_file: Path) -> tuple[list[int], list[float]]:
    """Training loss per logged step from a run's metrics.jsonl."""
    lines = metrics_file.read_text().splitlines() if metrics_file.is_file() else []
    records = [r for r in map(json.loads, lines) if r.get("kind") == "train" and "loss" in r]
    return [r["step"] for r in records], [r["loss"] for r in records]


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


Rows = Mapping[str, Mapping[str, Sequence[float]]]  # method -> metric -> one value per seed
CLASSES = 20  # ShapeWorld's class task: shape of the largest object x its quadrant


def cell(values: Sequence[float], percent: bool = True) -> str:
    """ "mean ± std (n seeds)" of fractions, shown in percent or with 4 digits."""
    mean, spread = mean_and_spread([v * (100.0 if percent else 1.0) for v in values])
    digits = 1 if percent else 4
    return f"{mean:.{digits}f} ± {spread:.{digits}f} ({len(values)})"


def markdown_table(title: str, rows: Rows, percent: bool = True) -> str:
    """rows: method -> metric -> one value per seed; cells read "mean ± std (n seeds)"."""
    metrics = list(dict.fromkeys(m for by_metric in rows.values() for m in by_metric))
    header = "| method | " + " | ".join(metrics) + " |"
    lines = [f"### {title}", "", header, "|---" * (len(metrics) + 1) + "|"]
    for method, by_metric in rows.items():
        cells = [cell(by_metric[m], percent) if by_metric.get(m) else "not run" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _axes():
    """A 6 x 3.5 inch figure on the Agg canvas (no display on servers and CI) and its axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5))
    return figure, figure.subplots()


def _save(figure, axis, path: Path) -> Path:
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_losses(curves: Mapping[str, tuple[list[int], list[float]]], title: str, path: Path) -> Path:
    figure, axis = _axes()
    for label, (steps, values) in curves.items():
        if steps:
            axis.plot(steps, values, label=label, linewidth=1.2)
    axis.set(title=title, xlabel="step", ylabel="loss")
    return _save(figure, axis, path)


def plot_bars(rows: Rows, title: str, path: Path, chance: float | None = None) -> Path:
    """Grouped bars of mean accuracy (%) with the spread over seeds as error bars, and the chance line."""
    metrics = list(dict.fromkeys(m for by_metric in rows.values() for m in by_metric))
    width = 0.8 / max(1, len(rows))
    figure, axis = _axes()
    for offset, (method, by_metric) in enumerate(rows.items()):
        # A metric a method did not run is NaN, which matplotlib leaves undrawn (not a bar at 0).
        stats = [mean_and_spread([100 * v for v in by_metric.get(m) or [math.nan]]) for m in metrics]
        positions = [i + offset * width for i in range(len(metrics))]
        axis.bar(positions, [s[0] for s in stats], width, yerr=[s[1] for s in stats], label=method, capsize=2)
    if chance is not None:
        axis.axhline(100 * chance, color="black", linestyle="--", linewidth=1, label="chance")
    axis.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(metrics))], metrics)
    axis.set(title=title, ylabel="accuracy (%)")
    return _save(figure, axis, path)


def _zeroshot_top1(metrics: Mapping[str, float]) -> float | None:
    """The zero-shot top-1 as a fraction (the CLIP task reports percent)."""
    values = [v for k, v in metrics.items() if k.startswith("zeroshot_") and k.endswith("_top1")]
    return values[0] / 100 if values else None


def verdict(
    claim: str,
    better: Sequence[float],
    worse: Sequence[float],
    chance: float = 1 / CLASSES,
    percent: bool = True,
) -> str:
    """A claim "`better` beats `worse`", read against both arms' spread over seeds and the chance level.

    A verdict needs at least two seeds per arm, a leading arm whose floor (mean - spread) is above
    `chance`, and a gap larger than the larger spread; otherwise it is inconclusive (docs/demo.md).
    """
    (a, a_spread), (b, b_spread) = mean_and_spread(better), mean_and_spread(worse)
    lead, lead_spread = (a, a_spread) if a >= b else (b, b_spread)
    if len(better) < 2 or len(worse) < 2:
        outcome = "inconclusive (one seed: no spread to compare with)"
    elif lead - lead_spread <= chance:
        outcome = "inconclusive (both are at chance level)"
    elif abs(a - b) <= max(a_spread, b_spread):
        outcome = "inconclusive (the difference is within the spread over seeds)"
    else:
        outcome = "**holds**" if a > b else "**does NOT hold**"
    scale, digits = (100, 1) if percent else (1, 3)  # accuracies in percent, AP and mIoU as fractions
    return (
        f"- {claim}: {outcome} ({scale * a:.{digits}f} ± {scale * a_spread:.{digits}f} vs "
        f"{scale * b:.{digits}f} ± {scale * b_spread:.{digits}f}, {len(better)} seed(s); "
        f"chance {scale * chance:.{digits}f})."
    )


def _verdicts(transfer: Rows, clip: Rows) -> list[str]:
    """One line per claim of the paper the demo tests."""
    clip_top1 = {name: scores.get("zero-shot top-1", []) for name, scores in clip.items()}
    eva = transfer["EVA (CLIP-feature MIM)"]
    verdicts = [
        verdict(f"CLIP-feature MIM beats {other} on {metric}", eva[metric], transfer[other][metric])
        for metric in ("linear probe", "fine-tune")
        for other in ("random init", "pixel MIM")
        if eva.get(metric) and transfer[other].get(metric)
    ]
    if all(clip_top1.values()):
        claim = "EVA-initialised CLIP beats from-scratch CLIP at equal samples"
        verdicts.append(verdict(claim, clip_top1["EVA-initialised CLIP"], clip_top1["from-scratch CLIP"]))
    return verdicts


def write_report(
    out: Path,
    teacher: Mapping,
    results: Mapping[int, Mapping],
    budget: object,
    wall_seconds: float,
    quick: bool,
) -> Path:
    """`out/report.md` plus PNG plots, from the stage results of every seed."""
    transfer: dict[str, dict[str, list[float]]] = {}
    clip: dict[str, dict[str, list[float]]] = {}
    for by_seed in results.values():
        for encoder, scores in by_seed["transfer"].items():
            for metric, value in scores.items():  # the classify task reports percent
                transfer.setdefault(encoder, {}).setdefault(metric, []).append(value / 100)
        for name, run in by_seed["clip"].items():
            top1 = _zeroshot_top1(run["zeroshot"])
            clip.setdefault(name, {}).setdefault("zero-shot top-1", []).extend([] if top1 is None else [top1])
    first = results[min(results)]
    plots = [
        plot_losses(
            {
                label: read_losses(Path(first["pretrain"][key]["losses"]))
                for label, key in (("EVA (CLIP features)", "eva"), ("pixel targets", "pixel"))
            },
            "MIM pretraining loss (negative cosine)",
            out / "pretrain_loss.png",
        ),
        plot_losses(
            {name: read_losses(Path(run["losses"])) for name, run in first["clip"].items()},
            "EVA-CLIP contrastive loss, first seed",
            out / "clip_loss.png",
        ),
        plot_bars(transfer, "ShapeWorld 20-class transfer", out / "transfer.png", chance=1 / CLASSES),
        plot_bars(clip, "Zero-shot accuracy (class prompts)", out / "zeroshot.png", chance=1 / CLASSES),
    ]
    # Every seed shares one pretraining per MIM arm: count it once.
    stage_seconds = sum(run.get("seconds", 0.0) for run in first["pretrain"].values()) + sum(
        run.get("seconds", 0.0) for by_seed in results.values() for run in by_seed["clip"].values()
    )
    teacher_top1 = _zeroshot_top1(teacher.get("zeroshot", {}))
    lines = [
        "# flyeva miniature world: EVA's pipeline on ShapeWorld" + (" (quick smoke run)" if quick else ""),
        "",
        "## Summary: what the paper predicts, and what this world shows",
        "",
        *_verdicts(transfer, clip),
        "",
        f"Chance level is {100 / CLASSES:.1f}% ({CLASSES} classes); {len(results)} seed(s). The teacher "
        f"(a tiny CLIP trained from scratch on ShapeWorld captions) reaches "
        f"{'n/a' if teacher_top1 is None else f'{100 * teacher_top1:.1f}%'} zero-shot top-1. Each MIM "
        "arm pretrains once; the seeds vary the probes, the fine-tunes and the CLIPs. A claim holds "
        "only when the gap exceeds both arms' spread over seeds and the leading arm's mean minus its "
        "spread is above chance; nothing here was tuned to agree with the paper (docs/demo.md).",
        "",
        f"![transfer]({plots[2].name})",
        "",
        "## Details",
        "",
        f"Wall time of this invocation: {wall_seconds / 60:.1f} min (stages resumed from earlier runs "
        f"are not counted). Budget: `{budget}`.",
        "",
        markdown_table("Transfer: top-1 (%) on ShapeWorld's 20 classes, mean ± spread (seeds)", transfer),
        markdown_table("EVA-CLIP in miniature: zero-shot top-1 (%), mean ± spread (seeds)", clip),
        "### Plots",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots if p != plots[2]],
        "",
        f"Pretraining + CLIP stages took {stage_seconds / 60:.1f} min of the total.",
    ]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(
        json.dumps({"teacher": teacher, "seeds": results}, indent=2, default=str)
    )
    return report


# task -> (the metric its verdicts read, that metric's floor, reported in percent?): the floor is chance
# for video (8 motions), an untrained detector's box AP50 and an all-background segmentation's mIoU
# (measured in docs/demo.md).
TASK_METRICS = {
    "video": ("top1", 0.125, True),
    "detect": ("box_AP50", 0.001, False),
    "segment": ("mIoU", 0.150, False),
}
NOT_METRICS = ("seconds",)


def task_section(tasks: Mapping[str, Mapping[str, Mapping[int, Mapping[str, float]]]]) -> str:
    """Each transfer task (task -> arm -> seed -> metrics): a table over seeds and its verdicts."""
    lines = ["## Transfer tasks (EVA = the CLIP-feature MIM encoder; recipes: docs/demo.md)", ""]
    for task, arms in tasks.items():
        metric, floor, percent = TASK_METRICS[task]
        scale = 0.01 if percent else 1.0  # the video task reports percent
        rows = {
            arm: {
                name: [scale * by_seed[seed][name] for seed in sorted(by_seed)]
                for name in next(iter(by_seed.values()))
                if name not in NOT_METRICS
            }
            for arm, by_seed in arms.items()
        }
        lines.append(markdown_table(f"{task} (floor of {metric}: {floor:g})", rows, percent))
        eva = rows["EVA init"][metric]
        lines += [
            verdict(f"EVA init beats {other} on {task} ({metric})", eva, rows[other][metric], floor, percent)
            for other in ("random init", "pixel MIM")
            if other in rows
        ]
        lines.append("")
    return "\n".join(lines)
