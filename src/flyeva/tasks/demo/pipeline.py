"""`flyeva demo`: EVA's whole pipeline in the miniature world (ShapeWorld, 2 CPU cores).

A tiny CLIP teacher trained from scratch (`flyeva clip train`); EVA MIM-pretrained from it and a
pixel-MIM baseline, once each (`flyeva pretrain`); linear probes and fine-tunes on ShapeWorld's 20
classes from EVA, pixel MIM, random init and the teacher's tower (`flyeva classify`); EVA-CLIP vs a
from-scratch CLIP at equal samples; `report.md` over seeds. `--stages` adds detection, segmentation
and video from EVA and random init (segmentation also from pixel MIM), each arm with its recipe.
Every stage writes `demo.json` when it finishes and is skipped when that exists; an interrupted one
resumes from its own checkpoints (docs/demo.md).
"""

from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flyeva.config import load_config, recipe_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoBudget:
    """How much of ShapeWorld each stage sees; `quick` is the CI smoke run."""

    # Sized so the core stays under 15 minutes on 2 idle CPU cores (measured in docs/demo.md). A
    # fine-tune runs 448 steps: a from-scratch miniature leaves its loss plateau at about 300.
    seeds: tuple[int, ...] = (0, 1, 2)
    teacher_samples: int = 4096
    teacher_epochs: int = 8  # 512 steps: the from-scratch vision tower leaves its plateau near 300
    pretrain_samples: int = 4096
    # 768 steps, once per arm, shared by the seeds: the CLIP-feature student leaves its loss plateau
    # near step 300, and 128 steps per seed left every MIM arm at chance (docs/demo.md).
    pretrain_epochs: int = 12
    probe_train: int = 2048
    probe_epochs: int = 10
    finetune_samples: int = 7168
    finetune_epochs: int = 4
    clip_samples: int = 1536
    clip_epochs: int = 2
    val_samples: int = 512


FULL = DemoBudget()
QUICK = DemoBudget(
    seeds=(0,), teacher_samples=512, teacher_epochs=2, pretrain_samples=512, pretrain_epochs=1,
    probe_train=512, probe_epochs=3, finetune_samples=256, finetune_epochs=1, clip_samples=256,
    clip_epochs=1, val_samples=256,
)  # fmt: skip

# No loader worker processes: at these sizes their start-up costs more than decoding ShapeWorld.
COMMON = [
    "train.device=cpu",
    "train.precision=fp32",
    "train.progress=false",
    "train.tensorboard=false",
    "train.num_workers=0",
]


def _world(samples: int, seed: int, target: str = "") -> str:
    target_part = f", target: {target}" if target else ""
    return f"{{type: shapeworld, num_samples: {samples}, seed: {seed}, image_size: 32{target_part}}}"


def _stage(folder: Path, run: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """`run(folder, *args)` once: its demo.json marks it done; a rerun resumes from its checkpoints."""
    done = folder / "demo.json"
    if done.is_file():
        return json.loads(done.read_text())
    started = time.time()
    result = {**run(folder, *args), "seconds": round(time.time() - started, 1)}
    folder.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(result, indent=2))
    return result


def train_teacher(out: Path, budget: DemoBudget) -> dict[str, Any]:
    from flyeva.tasks.clip.teacher import ensure_teacher

    overrides = [
        *COMMON,
        f"train.epochs={budget.teacher_epochs}",
        "train.seed=0",
        f"data.sources=[{_world(budget.teacher_samples, 0)}]",
        "model.vision.init=''",
        "zeroshot.during_training=true",
    ]
    result = ensure_teacher(out / "final", "miniature", overrides)
    return {"final": str(out / "final"), "zeroshot": result["metrics"] if result else {}}


def _train(stage: Any, recipe: str, out: Path, epochs: int, seed: int, *overrides: str) -> dict[str, Any]:
    """Train `stage` from its shipped `recipe` (COMMAND/NAME) with the demo's settings; its result record."""
    from flyeva.engine.stage import resolve, run_stage

    common = [*COMMON, f"train.output_dir={out}", f"train.epochs={epochs}", f"train.seed={seed}"]
    cfg = load_config(resolve(stage.config), recipe_path(*recipe.split("/")), [*common, *overrides])
    return run_stage(stage, cfg)


def pretrain(out: Path, teacher: str, budget: DemoBudget, target: str) -> dict[str, Any]:
    from flyeva.pretrain import PRETRAIN

    sources = f"data.sources=[{_world(budget.pretrain_samples, 10)}]"
    overrides = (sources, "data.val=[]", f"mask.target={target}", f"teacher.path='{teacher}'")
    _train(PRETRAIN, "pretrain/miniature", out, budget.pretrain_epochs, 0, *overrides)
    return {"final": str(out / "final"), "losses": str(out / "metrics.jsonl")}


def _classify(out: Path, init: str, seed: int, budget: DemoBudget, tune: bool) -> dict[str, Any]:
    """A linear probe, or with `tune` a fine-tune, of `init` on ShapeWorld's 20 classes."""
    from flyeva.tasks.classify import FINETUNE, LINPROBE

    stage, recipe = (FINETUNE, "classify/miniature") if tune else (LINPROBE, "classify/miniature_linprobe")
    samples = budget.finetune_samples if tune else budget.probe_train
    overrides = [
        f"model.init='{init}'",
        "model.size=miniature",
        *(["model.img_size=32"] if tune else []),
        f"data.train=[{_world(samples, 20 + seed)}]",
        f"data.val=[{_world(budget.val_samples, 999)}]",
    ]
    summary = _train(
        stage, recipe, out, budget.finetune_epochs if tune else budget.probe_epochs, seed, *overrides
    )
    return {"top1": summary["final"]["top1"], "best_top1": summary["best"]["top1"]}


def linear_probe(out: Path, init: str, seed: int, budget: DemoBudget) -> dict[str, Any]:
    return _classify(out, init, seed, budget, tune=False)


def finetune(out: Path, init: str, seed: int, budget: DemoBudget) -> dict[str, Any]:
    return _classify(out, init, seed, budget, tune=True)


def eva_clip(out: Path, vision_init: str, seed: int, budget: DemoBudget) -> dict[str, Any]:
    from flyeva.tasks.clip import CLIP_TRAIN

    sources = f"data.sources=[{_world(budget.clip_samples, 30 + seed)}]"
    overrides = (sources, f"model.vision.init='{vision_init}'", "zeroshot.during_training=true")
    result = _train(CLIP_TRAIN, "clip/miniature", out, budget.clip_epochs, seed, *overrides)
    return {"zeroshot": result["metrics"], "losses": str(out / "metrics.jsonl")}


ENCODERS = ("EVA (CLIP-feature MIM)", "pixel MIM", "random init", "teacher's vision tower")
FINETUNED = ENCODERS[:3]  # the claims compare these; the teacher's tower is only probed (time)


# core: teacher, MIM, classification and CLIP claims; ablation: the paper's pilot study (not in `all`)
STAGES = ("core", "detect", "segment", "video", "ablation")
# The arms of each transfer task, every one over the budget's seeds (docs/demo.md, the recipe rule).
TASK_ARMS = {
    "video": ("EVA init", "random init"),
    "detect": ("EVA init", "random init"),
    "segment": ("EVA init", "pixel MIM", "random init"),
}
QUICK_TASKS = {"detect": {"steps": 20, "train_images": 64, "val_images": 16}, "segment": {"steps": 10}}


def _run_task(
    stage: Callable[..., dict[str, float]], options: dict, folder: Path, init: str | None, seed: int
) -> dict:
    return stage(folder, init, seed, **options)


def _submit_tasks(
    pool: Executor,
    out: Path,
    inits: dict[str, str | None],
    stages: tuple[str, ...],
    seeds: tuple[int, ...],
    clips: dict[str, Any] | None,
    quick: bool,
) -> dict[str, dict[str, dict[int, Future]]]:
    """Each transfer task from each of its arms' inits, one job per (arm, seed); the longest tasks first."""
    from flyeva.tasks.detect.demo import run_demo_stage as detect_stage
    from flyeva.tasks.segment.demo import run_demo_stage as segment_stage
    from flyeva.tasks.video.demo import run_demo_stage as video_stage

    runs = {
        "video": (video_stage, {"data": clips, "quick": quick}),
        "detect": (detect_stage, QUICK_TASKS["detect"] if quick else {}),
        "segment": (segment_stage, QUICK_TASKS["segment"] if quick else {}),
    }
    futures: dict[str, dict[str, dict[int, Future]]] = {}
    for name in (task for task in TASK_ARMS if task in stages):
        stage, options = runs[name]
        run = functools.partial(_run_task, stage, options)
        futures[name] = {
            arm: {
                seed: pool.submit(
                    _stage, out / name / f"{arm.split()[0].lower()}_seed{seed}", run, inits[arm], seed
                )
                for seed in seeds
            }
            for arm in TASK_ARMS[name]
        }
    return futures


def _one_thread() -> None:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # the workers' load lines
    torch.set_num_threads(1)  # two 1-thread workers do ~1.27x the work of one 2-thread process


def _chain(*jobs: tuple) -> list[dict[str, Any]]:
    """Stages that depend on each other, one after another in one worker."""
    return [_stage(*job) for job in jobs]


def _chains(
    root: Path, pretrained: dict[str, str], teacher: str, seed: int, budget: DemoBudget
) -> dict[str, list[tuple]]:
    """One seed's transfer stages as chains, each stage needing only those before it in its chain and
    the pretraining of its arm (`pretrained`: arm -> final folder), which every seed shares."""

    def transfer(i: int, init: str) -> list[tuple]:
        probe = (root / f"probe{i}", linear_probe, init, seed, budget)
        tune = (root / f"finetune{i}", finetune, init, seed, budget)
        return [probe, tune] if ENCODERS[i] in FINETUNED else [probe]

    eva = pretrained["eva"]
    return {
        "pixel": transfer(1, pretrained["pixel"]),
        "random": [*transfer(2, ""), (root / "clip_scratch", eva_clip, "", seed, budget)],
        "eva": [*transfer(0, eva), (root / "clip_eva", eva_clip, eva, seed, budget)],
        "teacher": transfer(3, f"{teacher}/visual"),
    }


def _seed_results(chains: dict[str, list[dict[str, Any]]], pretrained: dict[str, Any]) -> dict[str, Any]:
    """The report's view of one seed: pretraining, per-encoder transfer, and the two CLIPs."""
    eva_probe, eva_tune, clip_eva = chains["eva"]
    pixel_probe, pixel_tune = chains["pixel"]
    random_probe, random_tune, clip_scratch = chains["random"]
    (teacher_probe,) = chains["teacher"]
    probes = (eva_probe, pixel_probe, random_probe, teacher_probe)
    tunes = (eva_tune, pixel_tune, random_tune, None)
    transfer = {
        name: {"linear probe": probe["top1"], **({"fine-tune": tune["top1"]} if tune else {})}
        for name, probe, tune in zip(ENCODERS, probes, tunes)
    }
    clips = {"EVA-initialised CLIP": clip_eva, "from-scratch CLIP": clip_scratch}
    return {"pretrain": pretrained, "transfer": transfer, "clip": clips}


def run_demo(
    out: str | Path = "runs/demo", quick: bool = False, stages: tuple[str, ...] = ("core",), workers: int = 2
) -> Path:
    """Run (or resume) the miniature pipeline's `stages` and write `out/report.md` (with the core) or
    `out/report_<stages>.md` (without it); returns its path.

    Independent chains of stages run in `workers` single-threaded processes: the teacher, for
    example, trains while the pixel-MIM pretraining (which does not need it) runs beside it. Each
    MIM arm pretrains once; the seeds vary its probes and fine-tunes and the CLIPs (docs/demo.md).
    """
    from flyeva.tasks.demo.report import task_section, write_report
    from flyeva.tasks.video.demo import write_demo_clips

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown demo stage(s) {unknown}; choose from {list(STAGES)}")
    out, budget, core = Path(out), QUICK if quick else FULL, "core" in stages
    seeds = budget.seeds if core else ()  # without the core only the pretraining the tasks need runs
    teacher_final = str(out / "teacher" / "final")
    finals = {arm: str(out / arm / "final") for arm in ("eva", "pixel")}
    chains = {seed: _chains(out / f"seed{seed}", finals, teacher_final, seed, budget) for seed in seeds}
    started = time.time()
    context = multiprocessing.get_context("spawn")  # a forked OpenMP runtime can hang the child
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:

        def submit(arm: str) -> dict[tuple[int, str], Future]:
            return {(seed, arm): pool.submit(_chain, *chains[seed][arm]) for seed in seeds}

        teacher_job = pool.submit(_stage, out / "teacher", train_teacher, budget)
        pixel_job = (
            pool.submit(_stage, out / "pixel", pretrain, "", budget, "pixels")
            if core or "segment" in stages
            else None
        )
        clips_job = (
            pool.submit(_stage, out / "video_data", write_demo_clips, quick) if "video" in stages else None
        )
        teacher = teacher_job.result()
        # EVA's pretraining first in the queue: its arm, its CLIP and the task stages wait for it.
        eva_job = pool.submit(_stage, out / "eva", pretrain, teacher_final, budget, "clip")
        jobs = submit("random") | submit("teacher")
        pretrained = {"pixel": pixel_job.result()} if pixel_job else {}
        jobs |= submit("pixel")
        pretrained["eva"] = eva_job.result()
        jobs |= submit("eva")
        inits = {"EVA init": finals["eva"], "pixel MIM": finals["pixel"], "random init": None}
        clips = clips_job.result() if clips_job else None
        task_jobs = _submit_tasks(pool, out, inits, stages, budget.seeds, clips, quick)
        results = {
            seed: _seed_results({arm: jobs[seed, arm].result() for arm in chains[seed]}, pretrained)
            for seed in seeds
        }
        tasks = {
            name: {
                arm: {seed: job.result() for seed, job in by_seed.items()} for arm, by_seed in arms.items()
            }
            for name, arms in task_jobs.items()
        }
    sections = []
    if tasks:
        tasks_file = out / "tasks.json"  # the tasks of earlier runs into this folder stay
        earlier = json.loads(tasks_file.read_text()) if tasks_file.is_file() else {}
        tasks_file.write_text(json.dumps(earlier | tasks, indent=2))
        sections.append(task_section(tasks))
    if "ablation" in stages:  # its own pool of workers, once the core's has finished: never 4 on 2 cores
        from flyeva.tasks.demo.ablation import QUICK_STEPS, STEPS, ablation_section, run_ablation

        ablation = run_ablation(out, budget.seeds, QUICK_STEPS if quick else STEPS, quick)
        (out / "ablation.json").write_text(json.dumps(ablation, indent=2))
        sections.append(ablation_section(ablation))
    # A run without the core never replaces the core's report: its own file is named after its stages.
    report = out / ("report.md" if core else f"report_{'_'.join(stages)}.md")
    if core:
        write_report(out, teacher, results, budget, wall_seconds=time.time() - started, quick=quick)
    else:
        report.write_text(f"# flyeva miniature world: {', '.join(stages)}\n\n")
    with open(report, "a") as handle:
        handle.writelines("\n" + section for section in sections)
    return report
