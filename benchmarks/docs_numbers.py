"""Keep the documented miniature numbers honest: run each documented command, read its result.json,
and compare the metric with the number the doc states.

    python benchmarks/docs_numbers.py [--only NAME ...] [--reuse DIR] [--workdir DIR]

Each claim names a doc, a sentence template with the number's place (`{metric:format}`), and the
command that produced it. The runs are deterministic on one CPU model (same seed, same threads), so
there a documented number either appears exactly as the run prints it or the doc is stale; another
CPU model rounds differently (the docs name the machine of each number). `--reuse DIR`
reads `DIR/<name>/result.json` of earlier runs instead of training again. Prints a table (claim, doc,
run, match) and exits 1 when a number differs. A full run trains every miniature recipe once: about
15 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Claim:
    name: str
    doc: str
    template: str  # the doc's words around the number: `{metric:.3f}` marks it
    command: tuple[str, ...]  # flyeva arguments; train.output_dir is added
    metric: str  # key of result.json's "metrics" (the last step's evaluation)
    scale: float = 1.0
    threads: int = 0  # OMP_NUM_THREADS the doc's command sets (0: torch's default)


CLAIMS = (
    Claim("classify_scratch", "docs/classify.md", "recipe reaches **{top1:.1f}%** top-1 from scratch",
          ("classify", "finetune"), "top1"),
    Claim("segment", "docs/segment.md", "mIoU **{mIoU:.3f}** (mAcc", ("segment", "train"), "mIoU"),
    Claim("detect", "docs/detect.md", "| **{bbox_AP:.3f}** | **", ("detect", "train"), "bbox_AP", threads=1),
    Claim("video", "docs/video.md", "from scratch it reaches {top1:.1f}% top-1", ("video", "train"), "top1"),
    Claim("clip_teacher", "docs/clip.md", "random weights it reaches {average_top1:.2f}% zero-shot top-1",
          ("clip", "train"), "average_top1"),
)  # fmt: skip

PLACE = re.compile(r"\{(\w+):[^}]*\}")


def documented(claim: Claim) -> str | None:
    """The number the doc states where the template's words stand, as written."""
    text = (ROOT / claim.doc).read_text()
    parts = PLACE.split(claim.template)
    pattern = re.escape(parts[0]) + r"([-0-9.]+)" + re.escape(parts[2])
    found = re.search(pattern, text)
    return found.group(1) if found else None


def measured(claim: Claim, workdir: Path, reuse: Path | None) -> str:
    folder = (reuse or workdir) / claim.name
    if reuse is None:
        command = [sys.executable, "-m", "flyeva.cli", *claim.command, f"train.output_dir={folder}"]
        env = {**os.environ, **({"OMP_NUM_THREADS": str(claim.threads)} if claim.threads else {})}
        subprocess.run(command, check=True, cwd=workdir, stdout=subprocess.DEVNULL, env=env)
    metrics = json.loads((folder / "result.json").read_text())["metrics"]
    spec = PLACE.search(claim.template).group(0).split(":", 1)[1][:-1]  # `.3f` of `{mIoU:.3f}`
    return format(metrics[claim.metric] * claim.scale, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[c.name for c in CLAIMS])
    parser.add_argument("--reuse", type=Path, help="read DIR/<claim>/result.json instead of training")
    parser.add_argument("--workdir", type=Path, help="where the runs go (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="docs_numbers_"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows, stale = [], 0
    for claim in (c for c in CLAIMS if c.name in args.only):
        doc, run = documented(claim), measured(claim, workdir, args.reuse)
        stale += doc != run
        match = "yes" if doc == run else "NO"
        rows.append((claim.name, claim.doc, doc or "(sentence not found)", run, match))
    print("| claim | doc | documented | this run | match |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"runs in {workdir}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
