"""Images/s, achieved GFLOP/s and peak memory of one full EVA MIM pretraining step.

One step = block masks + student forward/backward + frozen CLIP teacher forward + negative-cosine
loss + gradient clipping + AdamW step, built from the library's own pieces (EVA_SPEC section 3).
The table sits next to the machine's measured fp32 matmul ceiling (all threads and one thread).

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
import json
import resource
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops

from flyeva.data.masking import BlockMaskGenerator
from flyeva.engine.optim import OptimConfig, build_adamw, param_groups
from flyeva.models.eva import build_mim_model, encoder_flops, get_size, size_with
from flyeva.pretrain.objective import MIMObjective
from flyeva.teachers import build_clip_teacher, check_token_grid

MASK_RATIO = 105 / 256  # EVA_SPEC section 3: 105 of 256 patches (~40%), block-wise


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
    if any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"]):
        return counted, "FlopCounterMode"
    tokens, width = teacher.num_patches + 1, teacher.visual.transformer.width
    attention = teacher.visual.transformer.layers * 4 * tokens**2 * width
    return counted + attention, "FlopCounterMode + 4N^2D attention by formula"


def build_optimizer(model: torch.nn.Module, impl: str) -> torch.optim.Optimizer:
    """The library's AdamW (EVA_SPEC section 3 groups and betas); `impl` forces torch's implementation."""
    cfg = OptimConfig()
    groups = param_groups(model, cfg.weight_decay)
    if impl == "default":
        return build_adamw(groups, cfg)
    flags = {"foreach": dict(foreach=True), "fused": dict(fused=True), "for-loop": dict(foreach=False)}[impl]
    clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
    return torch.optim.AdamW(clean, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **flags)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_size(size_name: str, args: argparse.Namespace) -> dict:
    """Build student, teacher, objective and optimizer for one size, time the steps, return one row."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    teacher = build_teacher(args.teacher, device)
    size = size_with(get_size(size_name), patch_size=teacher.patch_size, img_size=teacher.image_size)
    model = build_mim_model(size, teacher_dim=teacher.embed_dim, drop_path_rate=0.1).to(device)
    check_token_grid(teacher, tuple(model.patch_embed.grid_size), size.img_size)
    if args.compile:
        model = torch.compile(model)
    optimizer = build_optimizer(model, args.adamw)
    generator = BlockMaskGenerator.from_ratio((size.grid_size, size.grid_size), MASK_RATIO)
    objective = MIMObjective(teacher, generator, size.patch_size)
    autocast_dtype = DTYPES[args.precision] if args.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    clip_grad = OptimConfig().clip_grad
    images = torch.randn(args.batch, 3, size.img_size, size.img_size, device=device)
    masked_counts: list[int] = []

    def train_step(step: int) -> None:
        ctx = types.SimpleNamespace(seed=0, epoch=0, step=step, micro=0, rank=0)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, metrics = objective(model, {"images": images}, ctx)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)  # EVA_SPEC section 3: clip 3.0
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        masked_counts.append(round(metrics["masked_fraction"] * size.grid_size**2))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup):
        train_step(step)
    sync(device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        train_step(step)
    sync(device)
    seconds = (time.perf_counter() - start) / args.steps
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
        batch=args.batch,
        step_s=seconds,
        images_per_s=args.batch / seconds,
        gflops_per_image=(student + teacher_flops) / 1e9,
        student_gflops_per_image=student / 1e9,
        teacher_gflops_per_image=teacher_flops / 1e9,
        achieved_gflops=flops_per_step / seconds / 1e9,
        peak_mib=memory,
        teacher_flops_note=teacher_note,
    )


def profile_steps(train_step, device: torch.device, rows: int) -> None:
    """Print where two steps spend their time, by op (self time), to stderr."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(1000, 1002):
            train_step(step)
        sync(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_by, row_limit=rows), file=sys.stderr)


def child_command(size_name: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--json", "--sizes", size_name]
    for key in ("teacher", "batch", "steps", "warmup", "device", "precision", "threads", "adamw", "profile"):
        command += [f"--{key}", str(getattr(args, key))]
    return command + (["--compile"] if args.compile else [])


def print_table(rows: list[dict], ceilings: dict[str, float], args: argparse.Namespace) -> None:
    reference_label = "fp32" if args.precision == "fp32" else args.precision
    reference = ceilings[reference_label]
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"precision {args.precision}, adamw {args.adamw}, compile {args.compile}")
    for label, value in ceilings.items():
        print(f"matmul ceiling {label}: {value:8.1f} GFLOP/s")
    header = (f"{'student':>10} {'patch':>5} {'teacher':>20} {'batch':>5} {'s/step':>7} {'img/s':>7} "
              f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'% ceil':>6} {'peak MiB':>9}")
    print(header)
    for row in rows:
        print(f"{row['size']:>10} {row['patch']:>5} {row['teacher']:>20} {row['batch']:>5} "
              f"{row['step_s']:>7.2f} {row['images_per_s']:>7.2f} {row['gflops_per_image']:>9.1f} "
              f"{row['achieved_gflops']:>8.1f} {100 * row['achieved_gflops'] / reference:>5.0f}% "
              f"{row['peak_mib']:>9.0f}")
    notes = sorted({row["teacher_flops_note"] for row in rows})
    print(f"% ceil = achieved / {reference_label} matmul ceiling (all threads); teacher FLOPs: {', '.join(notes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="eva_tiny,eva_base", help="comma-separated EVA_SIZES names")
    parser.add_argument("--teacher", default="ViT-B-16-quickgelu", help="open_clip name or JSON dict config")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--adamw", choices=["default", "foreach", "fused", "for-loop"], default="default",
                        help="default = flyeva's build_adamw (torch picks the implementation)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the ceiling's square matmul")
    parser.add_argument("--profile", type=int, default=0, help="print this many profiler rows per size")
    parser.add_argument("--json", action="store_true", help="print one JSON row per size, no ceiling")
    args = parser.parse_args()
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [name.strip() for name in args.sizes.split(",") if name.strip()]
    for name in sizes:
        get_size(name)  # fail fast on a typo, before any process starts

    if args.json:
        for name in sizes:
            print(json.dumps(measure_size(name, args)), flush=True)
        return

    rows = []
    for name in sizes:
        result = subprocess.run(child_command(name, args), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"size {name} failed (exit {result.returncode}); run it alone with --json to see why")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    ceilings = {"fp32": matmul_gflops(args.matmul_size, device=args.device)}
    if not args.device.startswith("cuda"):
        ceilings["fp32, 1 thread"] = matmul_gflops(args.matmul_size, threads=1)
    if args.precision != "fp32":
        ceilings[args.precision] = matmul_gflops(args.matmul_size, device=args.device, dtype=DTYPES[args.precision])
    print_table(rows, ceilings, args)


if __name__ == "__main__":
    main()
