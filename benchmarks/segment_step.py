"""Images/s, achieved GFLOP/s and peak memory of one semantic-segmentation training step.

One step = the segmenter's forward with labels (UperNet: cross-entropy on both heads; Mask2Former:
Hungarian matching + class/mask/dice losses on every decoder layer) + backward + AdamW over the
layer-decay groups, built from flyeva's own pieces (docs/segment.md). The table sits next to the
machine's matmul ceiling, measured in the same run.

    python benchmarks/segment_step.py                                   # eva_base @512, both decoders, CPU
    python benchmarks/segment_step.py --threads 2 --batch 2
    python benchmarks/segment_step.py --decoders mask2former --profile   # + where one step's time goes
    python benchmarks/segment_step.py --decoders mask2former_hf,mask2former --profile 15
    python benchmarks/segment_step.py --device cuda --size eva_giant --crop 896 --decoders mask2former \
        --m2f-hidden 1024 --m2f-heads 32 --m2f-ffn 4096 --m2f-layers 8 --queries 200 --grad-checkpointing

FLOPs per image are counted by `torch.utils.flop_counter` over one forward + backward (matmuls,
convolutions, attention; the deformable sampling and the matcher are not matmuls and are not
counted). Each decoder runs in a fresh process so peak memory (CPU: `ru_maxrss`; CUDA:
`max_memory_allocated`) belongs to it alone. CPU defaults use Mask2Former's standard width (256,
8 heads, FFN 2048, 9 layers, 100 queries); the EVA-g recipe's 1024-wide decoder is a GPU setting.
`mask2former_hf` is the same model with transformers' own loss, which grid-samples full-resolution
binary target masks (padded and indexed in every decoder layer) where flyeva reads the label map, and
transformers' own deformable attention, which stacks every level's samples before weighting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops, peak_memory_mib, sync

from flyeva.engine.optim import OptimConfig, build_adamw, layer_decay_groups
from flyeva.models.eva import get_size
from flyeva.tasks.segment.mask2former_config import Mask2FormerSection
from flyeva.tasks.segment.model import ModelSection, build_segmenter
from flyeva.tasks.segment.upernet import UperNetSection

TRANSFORMERS_PARTS = "mask2former_hf"


def use_transformers_parts(model: torch.nn.Module) -> None:
    """Swap in transformers' Mask2FormerLoss (fed one binary mask per present class) and its pixel
    decoder attention, as shipped."""
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerLoss,
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention,
    )

    class FullMaskLoss(Mask2FormerLoss):
        def forward(
            self,
            masks_queries_logits,
            class_queries_logits,
            mask_labels,
            class_labels,
            auxiliary_predictions=None,
        ):
            if mask_labels and isinstance(mask_labels[0], tuple):  # (label map, classes) from the model
                mask_labels = [(label[None] == kept[:, None, None]).float() for label, kept in mask_labels]
            predictions = (masks_queries_logits, class_queries_logits)
            return super().forward(*predictions, mask_labels, class_labels, auxiliary_predictions)

    head = model.decode_head
    for layer in head.pixel_decoder.encoder.layers:
        layer.self_attn.__class__ = Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention
    head.criterion = FullMaskLoss(head.config, head.weight_dict).to(head.criterion.empty_weight.device)


def build(decoder: str, args: argparse.Namespace) -> torch.nn.Module:
    mask2former = Mask2FormerSection(
        num_queries=args.queries,
        hidden_dim=args.m2f_hidden,
        num_heads=args.m2f_heads,
        dim_feedforward=args.m2f_ffn,
        decoder_layers=args.m2f_layers,
    )
    cfg = ModelSection(
        size=args.size,
        patch_size=16,
        decoder="mask2former" if decoder == TRANSFORMERS_PARTS else decoder,
        drop_path_rate=0.1,
        grad_checkpointing=args.grad_checkpointing,
        upernet=UperNetSection(channels=args.upernet_channels),
        mask2former=mask2former,
    )
    return build_segmenter(cfg, args.num_classes, args.crop)


def measure(decoder: str, args: argparse.Namespace) -> dict:
    """Time `args.steps` training steps of one decoder after `args.warmup`; return one row."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(decoder, args).to(device)
    if decoder == TRANSFORMERS_PARTS:
        use_transformers_parts(model)
    optim_cfg = OptimConfig(lr=4e-5, layer_decay=0.9, betas=[0.9, 0.999], eps=1e-8, clip_grad=0.0)
    optimizer = build_adamw(layer_decay_groups(model, replace(optim_cfg, weight_decay=0.05)), optim_cfg)
    autocast_dtype = DTYPES[args.precision] if args.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    images = torch.randn(args.batch, 3, args.crop, args.crop, device=device)
    # Blobs of a few classes, as a scene has: Mask2Former's matcher then sees realistic mask counts.
    coarse = torch.randint(
        0, args.num_classes, (args.batch, 1, args.crop // 64, args.crop // 64), device=device
    )
    labels = torch.nn.functional.interpolate(coarse.float(), size=(args.crop, args.crop)).long()[:, 0]

    def train_step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss, _ = model(images, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        train_step()
    flops_per_image = counter.get_total_flops() / args.batch
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        train_step()
    step_seconds = []
    for _ in range(args.steps):
        sync(device)
        start = time.perf_counter()
        train_step()
        sync(device)
        step_seconds.append(time.perf_counter() - start)
    seconds = statistics.median(step_seconds)  # robust to another process stealing a step or two
    if args.profile:
        profile_step(train_step, model, decoder, args.profile)
    return dict(
        decoder=decoder,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
        step_s=seconds,
        best_step_s=min(step_seconds),
        images_per_s=args.batch / seconds,
        gflops_per_image=flops_per_image / 1e9,
        achieved_gflops=args.batch * flops_per_image / seconds / 1e9,
        peak_mib=peak_memory_mib(device),
    )


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::convolution_backward",
              "aten::mkldnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::cudnn_convolution",
              "aten::_efficient_attention_forward", "aten::_efficient_attention_backward")  # fmt: skip


# The model's parts whose forward (and, through autograd's sequence numbers, backward) a profile names.
PARTS = {
    "backbone": "backbone",
    "pixel decoder": "decode_head.pixel_decoder",
    "transformer decoder": "decode_head.transformer_module",
    "loss + matcher": "decode_head.criterion",
    "head": "decode_head",
}


def mark_parts(model: torch.nn.Module) -> list:
    """Forward hooks that open a profiler range named after each part in `PARTS` the model has."""
    from torch.profiler import record_function

    handles, modules = [], dict(model.named_modules())
    for part, path in PARTS.items():
        if path not in modules:
            continue
        opened = []

        def open_range(*_, name=f"part: {part}", opened=opened) -> None:
            opened.append(record_function(name).__enter__())

        def close_range(*_, opened=opened) -> None:
            opened.pop().__exit__(None, None, None)

        handles.append(modules[path].register_forward_pre_hook(open_range))
        handles.append(modules[path].register_forward_hook(close_range))
    return handles


def part_of(event, forward_parts: dict[int, str]) -> str:
    """The innermost part range around a forward op, or the part whose forward made a backward op."""
    node = event
    while node is not None:
        if node.name.startswith("part: "):
            return node.name[6:]
        if node.name.startswith("autograd::engine::evaluate_function"):
            return forward_parts.get(node.sequence_nr, "other") + " (backward)"
        node = node.cpu_parent
    return "optimizer, other"


def profile_step(train_step, model: torch.nn.Module, decoder: str, top: int) -> None:
    """One more step under torch.profiler, on stderr: the `top` operators by self time, the share that is
    not matmul, convolution or attention kernels, and the same split per part of the model."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    handles = mark_parts(model)
    with profile(activities=activities) as prof:
        train_step()
    for handle in handles:
        handle.remove()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    print(f"{decoder}: one profiled step, {total / 1e6:.2f} s of operator self time; matmul, convolution "
          f"and attention kernels {100 * matmul / total:.0f}%, the rest {100 - 100 * matmul / total:.0f}%",
          file=sys.stderr)  # fmt: skip
    for event in events[:top]:
        share, seconds = 100 * event.self_cpu_time_total / total, event.self_cpu_time_total / 1e6
        print(f"  {share:5.1f}%  {seconds:7.3f} s  {event.count:6d} calls  {event.key}", file=sys.stderr)
    print_parts(prof.events(), total)


def print_parts(events, total: float) -> None:
    """Self time per part: its share of the step, of it in matmul kernels, and its three largest other ops."""
    forward_parts = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            part = part_of(event, {})
            if part != "optimizer, other" and not part.endswith("(backward)"):
                forward_parts.setdefault(event.sequence_nr, part)
    per_part: dict[str, dict[str, float]] = {}
    for event in events:
        if event.name.startswith(("part: ", "autograd::engine::evaluate_function")):
            continue
        ops = per_part.setdefault(part_of(event, forward_parts), {})
        ops[event.name] = ops.get(event.name, 0.0) + event.self_cpu_time_total
    print("  part                             share  matmul  largest other operators (share of the step)",
          file=sys.stderr)  # fmt: skip
    for part, ops in sorted(per_part.items(), key=lambda item: -sum(item[1].values())):
        spent = sum(ops.values())
        matmul = sum(t for name, t in ops.items() if name in MATMUL_OPS)
        others = sorted(((t, name) for name, t in ops.items() if name not in MATMUL_OPS), reverse=True)[:3]
        listed = ", ".join(f"{name.removeprefix('aten::')} {100 * t / total:.1f}%" for t, name in others)
        print(f"  {part:<32} {100 * spent / total:5.1f}% {100 * matmul / max(spent, 1):6.0f}%  {listed}",
              file=sys.stderr)  # fmt: skip


OPTIONS = ("size", "crop", "batch", "steps", "warmup", "device", "precision", "threads", "num_classes")
OPTIONS += ("upernet_channels", "queries", "m2f_hidden", "m2f_heads", "m2f_ffn", "m2f_layers")


def child_command(decoder: str, args: argparse.Namespace) -> list[str]:
    command = [sys.executable, __file__, "--json", "--decoders", decoder]
    for key in OPTIONS:
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    command += ["--profile", str(args.profile)] if args.profile else []
    return command + (["--grad-checkpointing"] if args.grad_checkpointing else [])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--decoders", default="upernet,mask2former")
    parser.add_argument("--size", default="eva_base", help="an EVA_SIZES name (patch resized to 16)")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps after the counted one")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument(
        "--upernet-channels", type=int, default=768, help="768 eva_base, 1024 eva_large/giant"
    )
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--m2f-hidden", type=int, default=256)
    parser.add_argument("--m2f-heads", type=int, default=8)
    parser.add_argument("--m2f-ffn", type=int, default=2048)
    parser.add_argument("--m2f-layers", type=int, default=9)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument(
        "--profile", type=int, nargs="?", const=25, default=0, help="profile a step: top N ops"
    )
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the ceiling's square matmul")
    parser.add_argument("--json", action="store_true", help="print one JSON row per decoder, no ceiling")
    args = parser.parse_args()
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    get_size(args.size)  # fail fast on a typo, before any process starts
    if args.batch < 2 and "upernet" in args.decoders:
        parser.error(
            "--batch must be >= 2 for UperNet: its BatchNorm needs 2+ values per channel at pool scale 1"
        )
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decoders = [name.strip() for name in args.decoders.split(",") if name.strip()]
    if args.json:
        for decoder in decoders:
            print(json.dumps(measure(decoder, args)), flush=True)
        return
    load_before = os.getloadavg()[0]
    rows = []
    for decoder in decoders:
        result = subprocess.run(child_command(decoder, args), stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            sys.exit(f"{decoder} failed (exit {result.returncode}); run it alone with --json to see why")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    label = (
        args.precision
        if args.device.startswith("cuda")
        else f"{args.precision}, {torch.get_num_threads()} threads"
    )
    ceiling = matmul_gflops(args.matmul_size, device=args.device, dtype=DTYPES[args.precision])
    print(
        f"torch {torch.__version__}, device {args.device}, {args.size} @{args.crop}, batch {args.batch}, "
        f"precision {args.precision}, grad checkpointing {args.grad_checkpointing}"
    )
    print(f"matmul ceiling ({label}): {ceiling:.1f} GFLOP/s")
    print(
        f"{'decoder':>15} {'params M':>8} {'s/step':>7} {'best':>6} {'img/s':>6} {'GFLOP/img':>9} "
        f"{'GFLOP/s':>8} {'%ceil':>5} {'peak MiB':>8}"
    )
    for row in rows:
        print(
            f"{row['decoder']:>15} {row['params_m']:>8.1f} {row['step_s']:>7.2f} {row['best_step_s']:>6.2f} "
            f"{row['images_per_s']:>6.2f} {row['gflops_per_image']:>9.1f} {row['achieved_gflops']:>8.1f} "
            f"{100 * row['achieved_gflops'] / ceiling:>4.0f}% {row['peak_mib']:>8.0f}"
        )
    print("s/step, img/s, GFLOP/s: median step; best: fastest step; GFLOP/img: forward + backward")
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
