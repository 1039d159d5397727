"""summary.json of a classification run: per-epoch top-1/top-5, best and final, a confusion summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flyeva.tasks.classify.objective import Evaluator, confusion_summary


def epoch_evaluations(metrics_file: Path) -> list[dict[str, Any]]:
    """The run's evaluation records from metrics.jsonl, each with the epoch it closed (from 0)."""
    if not metrics_file.is_file():
        return []
    epochs_done, evaluations = 0, []
    for line in metrics_file.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "epoch":
            epochs_done += 1
        elif record["kind"] == "eval":
            values = {k: v for k, v in record.items() if k not in ("kind", "time")}
            evaluations.append({"epoch": epochs_done - 1, **values})
    return evaluations


def _best(evaluations: list[dict[str, Any]], prefix: str = "") -> dict[str, Any] | None:
    scored = [e for e in evaluations if f"{prefix}top1" in e]
    if not scored:
        return None
    best = max(scored, key=lambda e: e[f"{prefix}top1"])
    return {
        "epoch": best["epoch"],
        "step": best["step"],
        **{k: best[f"{prefix}{k}"] for k in ("top1", "top5", "loss")},
    }


def write_summary(
    out: Path, evaluator: Evaluator | None, classes: list[str] | None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write <out>/summary.json and return it."""
    evaluations = epoch_evaluations(out / "metrics.jsonl")
    summary: dict[str, Any] = {**(extra or {}), "epochs": evaluations}
    if evaluations:
        summary["best"] = _best(evaluations)
        summary["final"] = _best(evaluations[-1:])
        if "ema_top1" in evaluations[-1]:
            summary["best_ema"] = _best(evaluations, "ema_")
            summary["final_ema"] = _best(evaluations[-1:], "ema_")
    if evaluator is not None and evaluator.confusion is not None:
        summary["confusion"] = confusion_summary(evaluator.confusion, classes)
        if evaluator.ema_confusion is not None:
            summary["ema_confusion"] = confusion_summary(evaluator.ema_confusion, classes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
