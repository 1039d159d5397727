"""Rank-0 reporting: progress (a bar on a terminal, plain lines in a log file), TensorBoard, JSONL."""

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
        log_every: int = 10,
        images_per_step: int = 0,
        name: str = "",
    ):
        self.enabled = enabled
        self.prefix = f"{name}: " if name else ""  # which run a line is from, when runs share a terminal
        self.writer = None
        self.bar = None
        self.plain = False
        self.total_steps, self.log_every, self.images_per_step = total_steps, log_every, images_per_step
        self.start_step, self.start_time = start_step, time.time()
        self.earlier: list[dict[str, Any]] = []  # a resumed run's records up to its checkpoint
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        self.earlier = _records_up_to(folder / "metrics.jsonl", start_step)
        self.jsonl = open(folder / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 (lives as long as the run)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(folder / "tensorboard"))
        if progress and sys.stderr.isatty():
            self.bar = tqdm(
                total=total_steps, initial=start_step, dynamic_ncols=True, smoothing=0.1, unit="step"
            )
        # Off a terminal (CI, nohup, SLURM logs): one plain line every log_every steps, no carriage returns.
        self.plain = progress and self.bar is None

    def log(self, step: int, values: dict[str, Any], kind: str = "train", **fields: Any) -> None:
        """One record of `values` (also TensorBoard scalars); `fields` (the epoch) go to the record only."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, **fields, "time": round(time.time(), 3), **values}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def progress(self, step: int, values: dict[str, Any]) -> None:
        shown = {k: values.get(k) for k in ("loss", "lr")}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(
                {k: "skipped" if v is None else f"{v:.4g}" for k, v in shown.items()}, refresh=False
            )
        elif self.plain and (step % self.log_every == 0 or step == self.total_steps):
            print(self.prefix + self.plain_line(step, shown), file=sys.stderr, flush=True)

    def plain_line(self, step: int, values: dict[str, Any]) -> str:
        """`step 120/400 loss 0.1234 lr 1.20e-03 12.3 img/s eta 0:01:23`."""
        elapsed = max(1e-9, time.time() - self.start_time)
        done = step - self.start_step
        loss = "skipped" if values["loss"] is None else f"{values['loss']:.4f}"
        eta = int(elapsed / max(1, done) * (self.total_steps - step))
        rate = f" {done * self.images_per_step / elapsed:.1f} img/s" if self.images_per_step else ""
        eta_text = f"{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
        return f"step {step}/{self.total_steps} loss {loss} lr {values['lr']:.2e}{rate} eta {eta_text}"

    def line(self, text: str) -> None:
        """A summary line that survives the progress bar."""
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(self.prefix + text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()


def _records_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """On resume, forget what was logged after the checkpoint (those steps run again) and a line torn by a
    kill; returns the records kept."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    kept, records = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
            records.append(record)
    if len(kept) != len(lines) or not text.endswith("\n"):
        path.write_text("".join(kept))
    return records
