"""Images/s, achieved GFLOP/s and peak memory of one full EVA MIM pretraining step.

One step = block masks + student forward/backward + frozen CLIP teacher forward + negative-cosine
loss + gradient clipping + AdamW step, built from the library's own pieces (docs/recipes.md §3).
The teacher runs in `teacher.precision` as `flyeva pretrain` resolves it (`--teacher-precision`;
auto = bf16 on a CPU with AMX/AVX512-BF16, the training precision on a GPU). The table sits next
to the machine's measured fp32 matmul ceiling (all threads and one thread).

    python benchmarks/pretrain_step.py                                   # eva_tiny,eva_base, batch 8, CPU
    python benchmarks/pretrain_step.py --sizes eva_base --adamw fused --threads 2
    python benchmarks/pretrain_step.py --device cuda --precision bf16 --sizes eva_base,eva_large --batch 64
    python benchmarks/pretrain_step.py --sizes eva_base --profile 25     # torch.profiler table

The student takes the teacher's patch size and resolution so both tokenise the crop into the same
grid: with the default CLIP-B/16 teacher, eva_* runs at patch 16 (14x14 tokens); with
ViT-L-14-quickgelu it runs at EVA's patch 14 (16x16). `--teacher` also takes a JSON dict config
(see `flyeva.teachers.clip.arch_from_dict`), e.g. a B/14 tower.

FLOPs per image: student 3 x `encoder_flops` (forward + backward, the usual convention; the patch
embedding's unneeded input gradient is counted anyway) + 3 x the `lm_head` on masked tokens;
teacher forward counted by `FlopCounterMode` with the MHA fast path off (the fast path hides every
op from it), plus 4*N^2*D per block by formula when SDPA is invisible to it (CPU kernels).
Each size runs in a fresh process so that peak memory (CPU: `ru_maxrss`; CUDA:
`max_memory_allocated`) belongs to that size alone.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops, peak_memory_mib, sync

from flyeva.data.masking import BlockMaskGenerator
from flyeva.engine.loop import keep_freed_memory
from flyeva.engine.optim import ADAMW_IMPLEMENTATIONS, OptimConfig, build_adamw, param_groups
from flyeva.models.eva import build_mim_model, encoder_flops, get_size, size_with
from flyeva.pretrain.objective import MIMObjective
from flyeva.teachers import (
    TEACHER_PRECISIONS,
    build_clip_teacher,
    check_token_grid,
    precision_name,
    resolve_teacher_dtype,
)

MASK_RATIO = 105 / 256  # docs/recipes.md §3: 105 of 256 patches (~40%), block-wise


def build_teacher(spec: str, device: torch.device) -> torch.nn.Module:
    config = json.loads(spec) if spec.lstrip().startswith("{") else spec
    return build_clip_teacher(config, seed=0).to(device)


def teacher_flops_per_image(teacher: torch.nn.Module, device: torch.device) -> tuple[int, str]:
    """Forward FLOPs of one image through the teacher, and how they were counted."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.randn(1, 3, teacher.image_size, teacher.image_size, device=device)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the fused MHA kernel is invisible to FlopCounterMode
    try:
        with FlopCounterMode(display=False) as counter:
            teacher(image)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    counted = counter.get_total_flops()
    # CUDA SDPA kernels are counted, and so is the math fallback (bmm); CPU SDPA kernels are not.
    if any("scaled_dot_product" in str(op) or "bmm" in str(op) for op in counter.get_flop_counts()["Global"]):
        return counted, "FlopCounterMode"
    tokens, width = teacher.num_patches + 1, teacher.visual.transformer.width
    attention = teacher.visual.transformer.layers * 4 * tokens**2 * width
    return counted + attention, "FlopCounterMode + 4N^2D attention by formula"


class LabelledTeacher(torch.nn.Module):
    """The teacher under a profiler label, so `--profile` can split teacher from student time."""

    def __init__(self, teacher: torch.nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with record_function("phase: teacher forward"):
            return self.teacher(images)


def build_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    """The library's AdamW (docs/recipes.md §3 groups and betas) with `optim.implementation=impl`."""
    cfg = OptimConfig(implementation=impl)
    return build_adamw(param_groups(model, cfg.weight_decay), cfg)


def measure_size(size_name: str, args: argparse.Namespace) -> dict:
    """Build student, teacher, objective and optimizer for one size, time the steps, return one row."""
    device = torch.device(args.device)
    if device.type == "cpu" and args.malloc == "keep":
        keep_freed_memory()  # what the engine does for every CPU run
    torch.manual_seed(0)
    teacher = build_teacher(args.teacher, device)
    teacher.to(resolve_teacher_dtype(args.teacher_precision, args.precision, device))  # as run_pretrain
    size = size_with(get_size(size_name), patch_size=teacher.patch_size, img_size=teacher.image_size)
    model = build_mim_model(size, teacher_dim=teacher.embed_dim, drop_path_rate=0.1).to(device)
    check_token_grid(teacher, tuple(model.patch_embed.grid_size), size.img_size)
    if args.compile in ("student", "both"):
        model.compile()  # in place: parameter names (and so the optimizer groups) stay the same
    if args.compile in ("teacher", "both"):
        teacher.visual.transformer.compile()  # the blocks; the wrapper's inference_mode stays eager
    optimizer = build_optimizer(model, args.adamw)
    generator = BlockMaskGenerator.from_ratio((size.grid_size, size.grid_size), MASK_RATIO)
    objective = MIMObjective(LabelledTeacher(teacher), generator, size.patch_size)
    autocast_dtype = DTYPES[args.precision] if args.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    clip_grad = OptimConfig().clip_grad
    images = torch.randn(args.batch, 3, size.img_size, size.img_size, device=device)
    masked_counts: list[int] = []

    def train_step(step: int) -> None:
        ctx = types.SimpleNamespace(seed=0, epoch=0, step=step, micro=0, rank=0)
        autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with record_function("phase: masks + student forward + teacher forward + loss"), autocast:
            loss, metrics = objective(model, {"images": images}, ctx)
        with record_function("phase: student backward"):
            scaler.scale(loss).backward()
        with record_function("phase: gradient clipping"):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)  # docs/recipes.md §3: clip 3.0
        with record_function("phase: optimizer step"):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        masked_counts.append(round(metrics["masked_fraction"] * size.grid_size**2))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup):
        train_step(step)
    step_seconds, step_cpu_seconds, system_seconds = [], [], 0.0
    for step in range(args.warmup, args.warmup + args.steps):
        sync(device)
        start, cpu_start = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        train_step(step)
        sync(device)
        cpu_end = resource.getrusage(resource.RUSAGE_SELF)
        step_seconds.append(time.perf_counter() - start)
        system_seconds += cpu_end.ru_stime - cpu_start.ru_stime
        step_cpu_seconds.append(cpu_end.ru_utime + cpu_end.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime)
    # The median step: robust to another process stealing the CPU for a step or two.
    seconds = statistics.median(step_seconds)
    memory = peak_memory_mib(device)
    if args.profile:
        profile_steps(train_step, device, args.profile)

    masked_per_image = sum(masked_counts) / len(masked_counts)
    student = 3 * encoder_flops(size) + 3 * 2 * masked_per_image * size.embed_dim * teacher.embed_dim
    teacher_flops, teacher_note = teacher_flops_per_image(teacher, device)
    flops_per_step = args.batch * (student + teacher_flops)
    return dict(
        size=size_name,
        patch=size.patch_size,
        grid=size.grid_size,
        teacher=teacher.arch.name,
        teacher_precision=precision_name(teacher.dtype),
        batch=args.batch,
        step_s=seconds,
        step_s_all=[round(t, 4) for t in step_seconds],
        # CPU seconds this process used per step (all threads; spin-waits included). With --threads 1
        # it is the wall time the step would take on an idle core, whatever else the machine runs.
        cpu_s=statistics.median(step_cpu_seconds),
        # Kernel time (page faults on freshly mapped tensors, thread wake-ups) as a share of CPU time.
        system_cpu_share=system_seconds / max(1e-9, sum(step_cpu_seconds)),
        images_per_s=args.batch / seconds,
        gflops_per_image=(student + teacher_flops) / 1e9,
        student_gflops_per_image=student / 1e9,
        teacher_gflops_per_image=teacher_flops / 1e9,
        achieved_gflops=flops_per_step / seconds / 1e9,
        peak_mib=memory,
        teacher_flops_note=teacher_note,
    )


# Profiler op name fragments -> category, first match wins (self time, so nothing is counted twice).
OP_CATEGORIES = [
    ("matmul (linear, conv)", ("addmm", "aten::mm", "bmm", "convolution", "linear")),
    (
        "attention kernels (SDPA, softmax, MHA)",
        ("scaled_dot_product", "softmax", "multi_head", "rescale_qkv"),
    ),
    ("layernorm", ("layer_norm",)),
    ("activation (GELU, QuickGELU sigmoid)", ("gelu", "sigmoid")),
    ("AdamW math (lerp, addcmul, addcdiv, sqrt)", ("lerp", "addcmul", "addcdiv", "sqrt", "_fused_adam")),
]


def profile_steps(train_step, device: torch.device, rows: int, steps: int = 2) -> None:
    """Print, to stderr, where `steps` steps spend their time: by phase, by op category, top ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, with_flops=True) as prof:
        for step in range(1000, 1000 + steps):
            train_step(step)
        sync(device)
    events = prof.key_averages()
    device_time = device.type == "cuda"
    self_ms = {
        e.key: (e.self_device_time_total if device_time else e.self_cpu_time_total) / 1e3 / steps
        for e in events
    }
    total_ms = sum(self_ms.values())
    print(
        f"\nprofile of {steps} steps ({'device' if device_time else 'CPU'} time, ms per step)",
        file=sys.stderr,
    )
    for e in events:
        if e.key.startswith("phase:"):
            ms = (e.device_time_total if device_time else e.cpu_time_total) / 1e3 / steps
            print(f"{ms:9.0f} {100 * ms / total_ms:5.1f}%  {e.key}", file=sys.stderr)
    categories = {label: 0.0 for label, _ in OP_CATEGORIES} | {"other (elementwise, copies, ...)": 0.0}
    for key, ms in self_ms.items():
        if key.startswith("phase:"):
            continue
        label = next((lab for lab, parts in OP_CATEGORIES if any(p in key for p in parts)), None)
        categories[label or "other (elementwise, copies, ...)"] += ms
    for label, ms in categories.items():
        print(f"{ms:9.0f} {100 * ms / total_ms:5.1f}%  op self time: {label}", file=sys.stderr)
    # The profiler's own FLOP counts cover mm/addmm/bmm/conv: how close the GEMMs alone get to the ceiling.
    matmul_parts = OP_CATEGORIES[0][1]
    matmul_events = [e for e in events if any(p in e.key for p in matmul_parts)]
    matmul_flops = sum(e.flops for e in matmul_events) / steps
    matmul_ms = sum(self_ms[e.key] for e in matmul_events)
    print(f"matmul ops alone: {matmul_flops / matmul_ms / 1e6:.1f} GFLOP/s", file=sys.stderr)
    sort_by = "self_device_time_total" if device_time else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=rows), file=sys.stderr)


def child_command(size_name: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--json", "--sizes", size_name]
    keys = (
        "teacher",
        "batch",
        "steps",
        "warmup",
        "device",
        "precision",
        "threads",
        "adamw",
        "profile",
        "malloc",
        "teacher_precision",
    )
    for key in keys:
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return [*command, "--compile", args.compile]


def print_table(rows: list[dict], ceilings: dict[str, float], args: argparse.Namespace) -> None:
    threads = torch.get_num_threads()
    on_cpu = not args.device.startswith("cuda")
    reference = ceiling_label(args.precision, threads if on_cpu else None)
    print(
        f"torch {torch.__version__}, device {args.device}, {threads} threads, "
        f"precision {args.precision}, teacher precision {rows[0]['teacher_precision']}, adamw {args.adamw}, "
        f"compile {args.compile}, malloc {args.malloc}"
    )
    for label, value in ceilings.items():
        print(f"matmul ceiling {label}: {value:8.1f} GFLOP/s")
    print(
        f"{'student':>9} {'patch':>5} {'teacher':>18} {'batch':>5} {'s/step':>7} {'best':>6} {'img/s':>6} "
        f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'%ceil':>5} {'best':>5} {'%mixed':>6} {'%core':>5} {'peak MiB':>8}"
    )
    for row in rows:
        ceiling = ceilings[reference]
        # The step's FLOPs at the ceiling of the precision each part runs in, over the measured time.
        teacher_ceiling = ceilings[ceiling_label(row["teacher_precision"], threads if on_cpu else None)]
        ideal_s = row["batch"] * (
            row["student_gflops_per_image"] / ceiling + row["teacher_gflops_per_image"] / teacher_ceiling
        )
        best_gflops = row["achieved_gflops"] * row["step_s"] / min(row["step_s_all"])
        core_share = "-"
        if on_cpu:
            per_cpu_second = row["achieved_gflops"] * row["step_s"] / row["cpu_s"]
            core_share = f"{100 * per_cpu_second / ceilings[ceiling_label(args.precision, 1)]:.0f}%"
        print(
            f"{row['size']:>9} {row['patch']:>5} {row['teacher']:>18} {row['batch']:>5} "
            f"{row['step_s']:>7.2f} {min(row['step_s_all']):>6.2f} {row['images_per_s']:>6.2f} "
            f"{row['gflops_per_image']:>9.1f} {row['achieved_gflops']:>8.1f} "
            f"{100 * row['achieved_gflops'] / ceiling:>4.0f}% {100 * best_gflops / ceiling:>4.0f}% "
            f"{100 * ideal_s / row['step_s']:>5.0f}% {core_share:>5} {row['peak_mib']:>8.0f}"
        )
    notes = sorted({row["teacher_flops_note"] for row in rows})
    print(f"s/step, img/s, GFLOP/s, %ceil: median step; best: fastest step; ceiling: matmul {reference}")
    print(
        "%mixed: median step against the ceilings of the precisions its parts run in (student: "
        f"{args.precision}, teacher: {rows[0]['teacher_precision']}); equal to %ceil when they are the same"
    )
    if on_cpu:
        print(
            "%core: FLOPs per CPU-second of the process / 1-thread ceiling (with --threads 1 it does not "
            "depend on what else the machine runs)"
        )
    print(f"teacher FLOPs: {', '.join(notes)}")


def ceiling_label(dtype_name: str, threads: int | None) -> str:
    if threads is None:
        return dtype_name
    return f"{dtype_name}, {threads} thread" + ("s" if threads > 1 else "")


def measure_ceilings(args: argparse.Namespace) -> dict[str, float]:
    """Matmul ceilings in fp32, the run's and the teacher's precision; on CPU at the run's thread count
    and at 1 thread."""
    threads = torch.get_num_threads() if not args.device.startswith("cuda") else None
    ceilings = {}
    teacher_dtype = resolve_teacher_dtype(args.teacher_precision, args.precision, torch.device(args.device))
    for dtype_name in dict.fromkeys(["fp32", args.precision, precision_name(teacher_dtype)]):
        measure = functools.partial(matmul_gflops, args.matmul_size, repeats=10, dtype=DTYPES[dtype_name])
        ceilings[ceiling_label(dtype_name, threads)] = measure(device=args.device)
        if threads is not None and threads > 1:
            ceilings[ceiling_label(dtype_name, 1)] = measure(threads=1)
    return ceilings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="eva_tiny,eva_base", help="comma-separated EVA_SIZES names")
    parser.add_argument("--teacher", default="ViT-B-16-quickgelu", help="open_clip name or JSON dict config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument(
        "--teacher-precision",
        choices=["auto", *TEACHER_PRECISIONS],
        default="auto",
        help="teacher.precision of the pretrain recipe (auto: bf16 where native, as flyeva pretrain does)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument(
        "--adamw",
        choices=sorted(ADAMW_IMPLEMENTATIONS),
        default=OptimConfig().implementation,
        help="optim.implementation of flyeva's build_adamw",
    )
    parser.add_argument(
        "--malloc",
        choices=["keep", "default"],
        default="keep",
        help="CPU: keep = the engine's keep_freed_memory() (glibc keeps freed tensors); default = glibc's",
    )
    compile_choices = ["off", "student", "teacher", "both"]
    parser.add_argument("--compile", choices=compile_choices, default="off", help="torch.compile (inductor)")
    parser.add_argument(
        "--matmul-size", type=int, default=0, help="ceiling matmul side (0: 2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--profile", type=int, default=0, help="print this many profiler rows per size")
    parser.add_argument("--json", action="store_true", help="print one JSON row per size, no ceiling")
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.precision = args.precision or ("bf16" if on_cuda else "fp32")
    args.matmul_size = args.matmul_size or (8192 if on_cuda else 2048)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    for name in sizes:
        try:
            get_size(name)  # fail fast on a typo, before any process starts
        except ValueError as err:
            parser.error(str(err))

    if args.json:
        for name in sizes:
            print(json.dumps(measure_size(name, args)), flush=True)
        return

    load_before = os.getloadavg()[0]
    ceilings = measure_ceilings(args)
    rows = []
    for name in sizes:
        result = subprocess.run(child_command(name, args), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"size {name} failed (exit {result.returncode}); run it alone with --json to see why")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    # Ceilings before and after the runs, best of both: a busy machine only ever lowers them.
    ceilings = {label: max(value, ceilings[label]) for label, value in measure_ceilings(args).items()}
    print_table(rows, ceilings, args)
    # Other processes on the machine slow every row; a load near or above the core count says so.
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
