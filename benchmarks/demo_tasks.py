"""Run `flyeva demo`'s transfer-task stages one job at a time, into the demo's own folders.

Each job is TASK:ARM:SEED (arm: eva, random, pixel) and lands where `flyeva demo --stages ...` looks
for it (OUT/TASK/ARM_seedSEED/demo.json), so a later `flyeva demo` run reuses it and only writes the
report. `--video-ablation NAME=OVERRIDE[,OVERRIDE]` runs the video stage's EVA arm with extra
overrides into OUT/video/NAME_seedSEED instead (docs/demo.md, the video ablation); `--init` replaces
its encoder. The EVA and pixel arms need OUT/eva/final and OUT/pixel/final (the demo's pretraining).

    python benchmarks/demo_tasks.py --out runs/demo video:random:0 detect:random:0
    python benchmarks/demo_tasks.py --video-ablation tiled=model.temporal_pos_std=0 video:eva:0
"""

from __future__ import annotations

import argparse
import functools
import logging
import time
from pathlib import Path

import torch

from flyeva.tasks.demo.pipeline import QUICK_TASKS, _run_task, _stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("jobs", nargs="+", help="TASK:ARM:SEED, e.g. video:eva:0")
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--video-ablation", default="", help="NAME=OVERRIDE[,OVERRIDE...] for video:eva jobs")
    parser.add_argument("--init", default="", help="the eva arm's init instead of OUT/eva/final")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    from flyeva.tasks.detect.demo import run_demo_stage as detect_stage
    from flyeva.tasks.segment.demo import run_demo_stage as segment_stage
    from flyeva.tasks.video.demo import run_demo_stage as video_stage
    from flyeva.tasks.video.demo import write_demo_clips

    out = Path(args.out)
    inits = {
        "eva": args.init or str(out / "eva" / "final"),
        "pixel": str(out / "pixel" / "final"),
        "random": None,
    }
    name, _, extra = args.video_ablation.partition("=")
    for job in args.jobs:
        task, arm, seed = job.split(":")
        folder = out / task / f"{arm}_seed{seed}"
        if task == "video":
            clips = _stage(out / "video_data", write_demo_clips, args.quick)
            options = {"data": clips, "quick": args.quick}
            if name:
                options["extra"] = extra.split(",")
                folder = out / task / f"{name}_seed{seed}"
            stage = video_stage
        else:
            stage = {"detect": detect_stage, "segment": segment_stage}[task]
            options = QUICK_TASKS[task] if args.quick else {}
        started = time.time()
        result = _stage(folder, functools.partial(_run_task, stage, options), inits[arm], int(seed))
        print(f"{job} ({folder}): {result} [{time.time() - started:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
