"""Rank-0 reporting: a progress bar, TensorBoard scalars and a JSONL metrics file."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class MetricsLogger:
    """Writes `metrics.jsonl` (one JSON object per line) and TensorBoard scalars; silent off rank 0."""

    def __init__(
        self,
        folder: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        progress: bool,
        total_steps: int,
        start_step: int,
    ):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        _drop_records_after(folder / "metrics.jsonl", start_step)
        self.jsonl = open(folder / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        if progress:
            # Off a terminal (CI logs, nohup) refresh rarely so the log stays readable.
            interval = 0.1 if sys.stderr.isatty() else 30.0
            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                dynamic_ncols=True,
                smoothing=0.1,
                unit="step",
                mininterval=interval,
            )

    def log(self, step: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, step: int, values: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def line(self, text: str) -> None:
        """A summary line that survives the progress bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def _drop_records_after(path: Path, step: int) -> None:
    """On resume, forget what was logged after the checkpoint: those steps run again."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(kept))
