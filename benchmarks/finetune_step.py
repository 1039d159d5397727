"""Images/s, achieved GFLOP/s and peak memory of one classification fine-tuning step.

One step = CutMix (timm `Mixup`, the IN-21K recipe's) + classifier forward (mean-pooled patch tokens ->
fc_norm -> head) + soft-target cross-entropy + backward + AdamW over layer-decayed groups, built from
flyeva's own pieces (docs/recipes.md §4). The table sits next to the machine's matmul ceiling.

    python benchmarks/finetune_step.py                                  # eva_tiny,eva_base @224, batch 8, CPU
    python benchmarks/finetune_step.py --sizes eva_base --img-size 336 --threads 2
    python benchmarks/finetune_step.py --device cuda --sizes eva_base,eva_large --batch 64
    python benchmarks/finetune_step.py --device cuda --sizes eva_giant --img-size 336 --batch 16 \
        --grad-checkpointing

FLOPs per image: 3 x `encoder_flops` at the run's resolution (forward + backward) + 3 x the head.
Each size runs in a fresh process so that peak memory (CPU: `ru_maxrss`; CUDA:
`max_memory_allocated`) belongs to that size alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops, peak_memory_mib, sync

from flyeva.engine.optim import OptimConfig, build_adamw, layer_decay_groups
from flyeva.eval.classification import ClassificationObjective
from flyeva.models.eva import encoder_flops, get_size, size_with
from flyeva.tasks.classify.model import build_classifier


def measure_size(size_name: str, args: argparse.Namespace) -> dict:
    """Build the classifier, objective and optimizer for one size, time the steps, return one row."""
    device = torch.device(args.device)
    size = size_with(get_size(size_name), img_size=args.img_size or get_size(size_name).img_size)
    torch.manual_seed(0)
    model = build_classifier(
        size, args.num_classes, drop_path_rate=0.4, grad_checkpointing=args.grad_checkpointing
    ).to(device)
    optim_cfg = OptimConfig(lr=3e-5, layer_decay=0.95, betas=[0.9, 0.999], eps=1e-8, clip_grad=0.0)
    optimizer = build_adamw(layer_decay_groups(model, optim_cfg), optim_cfg)
    mixup = dict(mixup_alpha=0.0, cutmix_alpha=1.0) if args.cutmix else None
    objective = ClassificationObjective(args.num_classes, smoothing=0.1, mixup=mixup)
    autocast_dtype = DTYPES[args.precision] if args.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(args.batch, 3, size.img_size, size.img_size, device=device)
    labels = torch.randint(0, args.num_classes, (args.batch,), device=device)

    def train_step(step: int) -> None:
        ctx = types.SimpleNamespace(seed=0, epoch=0, step=step, micro=0, rank=0)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = objective(model, {"images": images.clone(), "labels": labels}, ctx)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup):
        train_step(step)
    step_seconds = []
    for step in range(args.warmup, args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        train_step(step)
        sync(device)
        step_seconds.append(time.perf_counter() - start)
    seconds = statistics.median(step_seconds)  # robust to another process stealing a step or two
    flops_per_image = 3 * encoder_flops(size) + 3 * 2 * size.embed_dim * args.num_classes
    return dict(
        size=size_name,
        img=size.img_size,
        batch=args.batch,
        step_s=seconds,
        best_step_s=min(step_seconds),
        images_per_s=args.batch / seconds,
        gflops_per_image=flops_per_image / 1e9,
        achieved_gflops=args.batch * flops_per_image / seconds / 1e9,
        peak_mib=peak_memory_mib(device),
    )


def child_command(size_name: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--json", "--sizes", size_name]
    for key in ("img_size", "batch", "steps", "warmup", "device", "precision", "threads", "num_classes"):
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--grad-checkpointing"] if args.grad_checkpointing else []
    return command + (["--cutmix"] if args.cutmix else ["--no-cutmix"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="eva_tiny,eva_base", help="comma-separated EVA_SIZES names")
    parser.add_argument("--img-size", type=int, default=0, help="0 = the size's own (224)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--cutmix", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the ceiling's square matmul")
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

    load_before = os.getloadavg()[0]
    rows = []
    for name in sizes:
        result = subprocess.run(child_command(name, args), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"size {name} failed (exit {result.returncode}); run it alone with --json to see why")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    on_cuda = args.device.startswith("cuda")
    label = args.precision if on_cuda else f"{args.precision}, {torch.get_num_threads()} threads"
    ceiling = matmul_gflops(args.matmul_size, device=args.device, dtype=DTYPES[args.precision])
    print(
        f"torch {torch.__version__}, device {args.device}, precision {args.precision}, "
        f"cutmix {args.cutmix}, grad checkpointing {args.grad_checkpointing}, {args.num_classes} classes"
    )
    print(f"matmul ceiling ({label}): {ceiling:.1f} GFLOP/s")
    print(
        f"{'size':>9} {'img':>4} {'batch':>5} {'s/step':>7} {'best':>6} {'img/s':>7} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'%ceil':>5} {'peak MiB':>8}"
    )
    for row in rows:
        print(
            f"{row['size']:>9} {row['img']:>4} {row['batch']:>5} "
            f"{row['step_s']:>7.3f} {row['best_step_s']:>6.3f} "
            f"{row['images_per_s']:>7.1f} {row['gflops_per_image']:>9.1f} {row['achieved_gflops']:>8.1f} "
            f"{100 * row['achieved_gflops'] / ceiling:>4.0f}% {row['peak_mib']:>8.0f}"
        )
    print("s/step, img/s, GFLOP/s: median step; best: fastest step")
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
