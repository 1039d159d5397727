"""Video: training-step clips/s and peak memory, decode clips/s per worker, joint-attention memory.

    python benchmarks/video_step.py                                  # eva_base, 8 and 16 frames, CPU
    python benchmarks/video_step.py --frames 8 --steps 1 --threads 2
    python benchmarks/video_step.py --device cuda --size eva_giant --frames 16 --batch 4 --grad-checkpointing

One training step = the video model (flyeva.tasks.video.model, 224 px, patch 14: 256 patches per
frame) forward + label-smoothed cross-entropy + backward + AdamW over layer-decayed groups. Decode
= one worker (one process, one thread) producing training clips from Kinetics-like H.264 files
(340x256, 25 fps, 10 s) through the real pipeline: timestamps, seek, decode, short side 256,
multi-scale crop to 224, flip, jitter, normalise. Attention memory = peak memory of one joint
attention forward + backward over 1 + T x 256 tokens, through SDPA and through an explicit softmax
(the release's path, which materialises T^2 x 256^2 scores per head). Every measurement runs in a
fresh process so its peak memory (CPU: ru_maxrss; CUDA: max_memory_allocated) is its own; the
matmul ceiling is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_step import peak_memory_mib, sync
from matmul_ceiling import matmul_gflops

from flyeva.data.video.datasets import VideoList
from flyeva.data.video.decode import get_decoder, torchcodec_available, write_video
from flyeva.data.video.stream import VideoSource
from flyeva.data.video.transforms import ClipTrainTransform
from flyeva.engine.optim import OptimConfig, build_adamw, layer_decay_groups
from flyeva.models.eva import get_size
from flyeva.tasks.video.model import build_video_model


def measure_step(args: argparse.Namespace, frames: int) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_video_model(
        get_size(args.size),
        400,
        num_frames=frames,
        drop_path_rate=0.1,
        grad_checkpointing=args.grad_checkpointing,
    ).to(device)
    optim = OptimConfig(lr=1e-6, layer_decay=0.95, betas=[0.9, 0.98], eps=1e-6)
    optimizer = build_adamw(layer_decay_groups(model, optim), optim)
    clips = torch.randn(args.batch, frames, 3, 224, 224, device=device)
    labels = torch.randint(0, 400, (args.batch,), device=device)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else None
    times = []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(clips).float(), labels, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    size = get_size(args.size)
    tokens = 1 + frames * 256
    per_block = (
        2 * tokens * size.embed_dim * (4 * size.embed_dim + 2 * size.mlp_dim) + 4 * tokens**2 * size.embed_dim
    )
    flops = 3 * size.depth * per_block
    return dict(part="step", frames=frames, tokens=tokens, step_s=step_s, clips_per_s=args.batch / step_s,
                gflops=args.batch * flops / step_s / 1e9, peak_mib=peak_memory_mib(device))  # fmt: skip


def measure_attention(args: argparse.Namespace, frames: int, explicit: bool) -> dict:
    device = torch.device(args.device)
    size = get_size(args.size)
    heads, tokens = size.num_heads, 1 + frames * 256
    shape = (1, heads, tokens, size.embed_dim // heads)
    q, k, v = (torch.randn(shape, device=device, requires_grad=True) for _ in range(3))
    baseline = peak_memory_mib(device)
    if explicit:  # the release's Attention.forward: fp32 scores, softmax, weighted sum
        scores = (q * shape[-1] ** -0.5) @ k.transpose(-2, -1)
        out = scores.softmax(dim=-1) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    sync(device)
    scores_mib = heads * tokens**2 * 4 / 2**20
    return dict(part="attention", frames=frames, tokens=tokens, explicit=explicit,
                peak_mib=peak_memory_mib(device) - baseline, scores_mib=scores_mib)  # fmt: skip


def measure_decode(args: argparse.Namespace, decoder_name: str) -> dict:
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="video_bench_"))
    rng = np.random.default_rng(0)
    paths = []
    for index in range(args.videos):
        base = rng.integers(0, 255, (256 // 8, 340 // 4, 3), dtype=np.uint8)
        frames = [np.roll(np.kron(base, np.ones((8, 4, 1), np.uint8)), 3 * t, axis=1) for t in range(250)]
        paths.append(str(write_video(folder / f"{index}.mp4", frames, fps=25)))
    videos = VideoList(paths, [0] * len(paths), ["a"])
    source = VideoSource(videos, get_decoder(decoder_name), args.decode_frames, 256, train=True)
    transform = ClipTrainTransform(224)
    start = time.perf_counter()
    for index in range(len(paths)):
        transform(source.load(index))
    seconds = time.perf_counter() - start
    return dict(
        part="decode", decoder=decoder_name, frames=args.decode_frames, clips_per_s=len(paths) / seconds
    )


def child(args: argparse.Namespace, part: str, value: str) -> dict:
    command = [
        sys.executable,
        __file__,
        "--json",
        part,
        value,
        "--size",
        args.size,
        "--batch",
        str(args.batch),
    ]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    command += [
        "--videos",
        str(args.videos),
        "--decode-frames",
        str(args.decode_frames),
        "--threads",
        str(args.threads),
    ]
    command += ["--grad-checkpointing"] if args.grad_checkpointing else []
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        sys.exit(f"{part} {value} failed (exit {result.returncode}); run it alone with --json to see why")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_json(args: argparse.Namespace, part: str, value: str) -> dict:
    if part == "step":
        return measure_step(args, int(value))
    if part == "attention":
        frames, mode = value.split(":")
        return measure_attention(args, int(frames), mode == "explicit")
    return measure_decode(args, value)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="eva_base")
    parser.add_argument("--frames", default="8,16", help="comma-separated clip lengths for the step")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads for steps (0 = default)"
    )
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--videos", type=int, default=8, help="files decoded per decoder")
    parser.add_argument("--decode-frames", type=int, default=16)
    parser.add_argument("--json", nargs=2, metavar=("PART", "VALUE"), help="one measurement (child process)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json:
        print(json.dumps(run_json(args, *args.json)), flush=True)
        return
    load_before = os.getloadavg()[0]
    frames = [int(f) for f in args.frames.split(",")]
    steps = [child(args, "step", str(f)) for f in frames]
    attention = [child(args, "attention", f"{f}:{mode}") for f in frames for mode in ("sdpa", "explicit")]
    decoders = ["pyav"] + (["torchcodec"] if torchcodec_available() else [])
    decode = [child(args, "decode", name) for name in decoders]
    ceiling = matmul_gflops(2048, device=args.device)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {args.device}, {threads} threads, {args.size}, batch {args.batch}")
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s (fp32)")
    header = ("frames", "tokens", "s/step", "clips/s", "GFLOP/s", "%ceil", "peak MiB")
    print("{:>6} {:>6} {:>7} {:>8} {:>8} {:>5} {:>8}".format(*header))
    for row in steps:
        percent = 100 * row["gflops"] / ceiling
        print(
            f"{row['frames']:>6} {row['tokens']:>6} {row['step_s']:>7.2f} {row['clips_per_s']:>8.3f} "
            f"{row['gflops']:>8.1f} {percent:>4.0f}% {row['peak_mib']:>8.0f}"
        )
    print(f"joint attention, one layer of {args.size}, batch 1, forward + backward (peak above baseline):")
    for row in attention:
        mode = "explicit softmax" if row["explicit"] else "SDPA"
        print(
            f"  {row['frames']:>2} frames ({row['tokens']} tokens) {mode:<16} {row['peak_mib']:>8.0f} MiB "
            f"(one fp32 score matrix over all heads: {row['scores_mib']:.0f} MiB)"
        )
    for row in decode:
        rate = row["clips_per_s"]
        print(f"decode {row['decoder']:<10} {row['frames']} frames/clip: {rate:.1f} clips/s per worker")
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
