"""One run as the engine left it: metrics.jsonl records, config.yaml, result.json; or the eval.json of
an evaluation without training."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE, CONFIG_FILE, SUMMARY_FILE = "metrics.jsonl", "config.yaml", "result.json"
EVAL_FILE = "eval.json"  # an evaluation without training (`eval` verbs): the same schema, no log


@dataclass
class RunLog:
    """The records of one run, split by kind (`train` every log_every steps, `eval`, `epoch`)."""

    name: str
    folder: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    unreadable_lines: int = 0

    def series(self, key: str, kind: str = "train") -> tuple[list[int], list[float]]:
        """(steps, values) of `key`; records without a number (a skipped step's null loss) are left out."""
        records = self.train if kind == "train" else self.evals
        points = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
        return [s for s, _ in points], [v for _, v in points]

    def eval_keys(self) -> list[str]:
        numeric = {k for r in self.evals for k, v in r.items() if isinstance(v, (int, float))}
        return sorted(numeric - {"step", "epoch", "time"})


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def read_run(folder: str | Path, name: str | None = None) -> RunLog:
    """Read a run folder; a torn last line (a run killed mid-write) is counted and skipped."""
    folder = Path(folder)
    metrics = folder / METRICS_FILE
    summary = folder / SUMMARY_FILE if (folder / SUMMARY_FILE).is_file() else folder / EVAL_FILE
    if not metrics.is_file() and not summary.is_file():
        raise FileNotFoundError(
            f"{folder} has no {METRICS_FILE} and no {EVAL_FILE}; pass a training output folder (the run's "
            "train.output_dir) or the output folder of an eval verb"
        )
    run = RunLog(name or folder.name, folder, config=_read_yaml(folder / CONFIG_FILE))
    if summary.is_file():
        run.summary = json.loads(summary.read_text())
    if not metrics.is_file():  # an evaluation: its numbers are the summary's
        return run
    buckets = {"train": run.train, "eval": run.evals, "epoch": run.epochs}
    for line in metrics.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            run.unreadable_lines += 1
            continue
        buckets.get(record.get("kind", "train"), run.train).append(record)
    if run.unreadable_lines:
        logger.warning("%s: %d unreadable lines skipped", metrics, run.unreadable_lines)
    return run


def unique_names(folders: list[Path]) -> list[str]:
    """Short labels for the legend: folder names, with the parent added where two collide."""
    names = [f.name for f in folders]
    return [f"{f.parent.name}/{f.name}" if names.count(f.name) > 1 else f.name for f in folders]
