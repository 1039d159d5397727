"""`flyeva demo --stages ablation`: the paper's pilot study (its Table 2) in the miniature world.

EVA chose masked CLIP-feature regression over feature distillation (`mask.target=distill`: the whole
image, the teacher's features at every patch, the same loss), whose gain the paper reports does not
hold as pretraining gets longer. Each arm pretrains once at two lengths from the demo's teacher
(`OUT/teacher`); the seeds vary the linear probes and fine-tunes, run with the demo's own stages.
"""

from __future__ import annotations

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path
from typing import Any

from flyeva.tasks.demo.pipeline import (
    FULL,
    QUICK,
    DemoBudget,
    _one_thread,
    _stage,
    finetune,
    linear_probe,
    pretrain,
    train_teacher,
)
from flyeva.tasks.demo.report import cell, mean_and_spread, read_losses, verdict

ARMS = {"CLIP-feature MIM": "clip", "feature distillation": "distill"}  # name -> mask.target
METRICS = ("linear probe", "fine-tune")
# Fine-tunes of one epoch (112 steps, a quarter of the core's): the stage's 12 fine-tunes (2 arms x 2
# lengths x 3 seeds) then cost 3 of the core's, and both arms start from pretrained weights.
FINETUNE_EPOCHS = 1
# Pretraining lengths: the CLIP-feature student leaves its plateau near step 300 (docs/demo.md), so
# 256 steps is before it and 768 (the core's) after; the quick run's are one and two epochs.
STEPS, QUICK_STEPS = (256, 768), (8, 16)


def _pretrain_budget(budget: DemoBudget, steps: int) -> DemoBudget:
    """`budget` with the pretraining `steps` long (whole epochs of the miniature recipe's batch)."""
    per_epoch = _steps_per_epoch(budget)
    if steps < per_epoch or steps % per_epoch:
        raise ValueError(f"pretraining steps must be a multiple of {per_epoch} (one epoch), got {steps}")
    return replace(budget, pretrain_epochs=steps // per_epoch)


def _steps_per_epoch(budget: DemoBudget) -> int:
    from flyeva.config import load_config, recipe_path
    from flyeva.pretrain.config import PretrainConfig

    batch = load_config(PretrainConfig, recipe_path("pretrain", "miniature")).train.batch_size
    return budget.pretrain_samples // batch


def _pretrain_folder(out: Path, target: str, steps: int, core: DemoBudget) -> Path:
    """Where one arm pretrains at one length; MIM at the core's length is the core's EVA (`OUT/eva`)."""
    if target == "clip" and steps == core.pretrain_epochs * _steps_per_epoch(core):
        return out / "eva"  # the same run as the core's: a demo with both stages pretrains it once
    return out / "ablation" / f"{target}_{steps}"


def _transfer(root: Path, init: str, seed: int, budget: DemoBudget) -> dict[str, float]:
    """One seed's linear probe and fine-tune of one pretraining (one worker, one after the other)."""
    probe = _stage(root / f"probe_seed{seed}", linear_probe, init, seed, budget)
    tune = _stage(root / f"finetune_seed{seed}", finetune, init, seed, budget)
    return {"linear probe": probe["top1"] / 100, "fine-tune": tune["top1"] / 100}  # fractions, as the report


def run_ablation(out: Path, seeds: tuple[int, ...], steps: tuple[int, int], quick: bool) -> dict:
    """Pretrain each arm at both lengths, then probe and fine-tune each pretraining once per seed.

    Returns {"seeds", "steps", "quick", "seconds", "arms": {arm: {str(steps): {"final", "pretrain loss",
    "linear probe": [one top-1 per seed], "fine-tune": [...]}}}}; every stage is cached like the demo's.
    """
    out, core = Path(out), QUICK if quick else FULL
    transfer_budget = replace(core, finetune_epochs=FINETUNE_EPOCHS)
    runs = [(arm, length) for length in sorted(steps, reverse=True) for arm in ARMS]  # the long ones first
    # The core's own pretraining last: a core run beside this one may still be writing it.
    runs.sort(key=lambda run: _pretrain_folder(out, ARMS[run[0]], run[1], core) == out / "eva")
    started = time.time()
    context = multiprocessing.get_context("spawn")  # as the demo's: a forked OpenMP runtime can hang
    with ProcessPoolExecutor(2, mp_context=context, initializer=_one_thread) as pool:
        pool.submit(_stage, out / "teacher", train_teacher, core).result()
        teacher = str(out / "teacher" / "final")
        jobs = {}
        for arm, length in runs:
            folder, budget = _pretrain_folder(out, ARMS[arm], length, core), _pretrain_budget(core, length)
            jobs[pool.submit(_stage, folder, pretrain, teacher, budget, ARMS[arm])] = (arm, length)
        arms: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
        transfers = {}
        for job in as_completed(jobs):
            arm, length = jobs[job]
            pretrained = job.result()
            _, losses = read_losses(Path(pretrained["losses"]))
            arms[arm][str(length)] = {"final": pretrained["final"], "pretrain loss": losses[-1]}
            root = out / "ablation" / f"{ARMS[arm]}_{length}"
            for seed in seeds:
                transfers[arm, length, seed] = pool.submit(
                    _transfer, root, pretrained["final"], seed, transfer_budget
                )
        for (arm, length, _seed), job in sorted(transfers.items(), key=lambda item: item[0][2]):
            for metric, value in job.result().items():
                arms[arm][str(length)].setdefault(metric, []).append(value)
    return {
        "seeds": list(seeds),
        "steps": list(steps),
        "quick": quick,
        "seconds": round(time.time() - started, 1),
        "arms": arms,
    }


def ablation_section(results: dict) -> str:
    """A markdown section: the table over seeds, one verdict per length, and the paper's reading."""
    steps, arms = results["steps"], results["arms"]
    mim, distill = ARMS
    lines = [
        "## The paper's pilot study: CLIP-feature MIM vs feature distillation (Table 2)",
        "",
        f"Top-1 (%) over {len(results['seeds'])} seed(s) (mean ± sample std); each pretraining ran once.",
        "",
        "| pretraining | steps | final loss (-cosine) | linear probe | fine-tune | per seed (fine-tune) |",
        "|---|---|---|---|---|---|",
    ]
    for length in steps:
        for arm in ARMS:
            row = arms[arm][str(length)]
            cells = [cell(row[metric]) for metric in METRICS]
            per_seed = ", ".join(f"{100 * v:.1f}" for v in row["fine-tune"])
            lines.append(
                f"| {arm} | {length} | {row['pretrain loss']:.3f} | {' | '.join(cells)} | {per_seed} |"
            )
    lines.append("")
    for length in steps:
        for metric in METRICS:
            claim = f"CLIP-feature MIM beats feature distillation on {metric} after {length} steps"
            lines.append(verdict(claim, arms[mim][str(length)][metric], arms[distill][str(length)][metric]))
    lines += ["", *(_reading(arms, steps, metric) for metric in METRICS), ""]
    return "\n".join(lines)


def _reading(arms: dict[str, dict[str, Any]], steps: list[int], metric: str) -> str:
    """The paper's claim on one metric: a lead of distillation at the short length gone at the long."""
    mim, distill = ARMS
    gaps, spreads = {}, {}
    for length in steps:
        (d, d_spread), (m, m_spread) = (
            mean_and_spread(arms[arm][str(length)][metric]) for arm in (distill, mim)
        )
        gaps[length], spreads[length] = 100 * (d - m), 100 * max(d_spread, m_spread)
    short, long = steps
    if gaps[short] <= spreads[short]:
        reading = "distillation has no gain to lose: it is not ahead at the shorter length"
    elif gaps[long] < gaps[short] and gaps[long] <= spreads[long]:
        reading = "**holds**: distillation's lead at the shorter length is gone at the longer one"
    else:
        reading = "**does NOT hold**: distillation stays ahead at the longer length"
    return (
        f"- The paper's reading on {metric}, distillation's gain does not hold as pretraining gets longer: "
        f"{reading} (distillation minus MIM: {gaps[short]:+.1f} points at {short} steps, spread "
        f"{spreads[short]:.1f}; {gaps[long]:+.1f} at {long}, spread {spreads[long]:.1f})."
    )
