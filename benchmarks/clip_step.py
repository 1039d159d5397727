"""Image-text pairs/s and achieved GFLOP/s of one EVA-CLIP training step, next to the matmul ceiling.

One step = tokenisation + both towers forward/backward + the contrastive loss (`ClipObjective`,
optionally with cached-feature micro-batches) + AdamW on the per-tower groups, built from the
library's own pieces. Sizes are the model sections of the CLIP recipes (configs/clip/*.yaml).

    python benchmarks/clip_step.py                                        # miniature + eva_clip_base, CPU
    python benchmarks/clip_step.py --recipes eva_clip_base --batch 16 --micro-batch 8
    python benchmarks/clip_step.py --device cuda --recipes eva_clip_base,eva_clip_giant --batch 64

FLOPs per pair = 3 x (vision forward + text forward) (forward + backward, the usual convention),
counted by formula (2 per multiply-add; norms, softmax and the loss left out). The extra
no-grad forward of cached-feature accumulation is overhead and is not counted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops

from flyeva.config import load_config, recipe_path
from flyeva.engine.optim import build_adamw
from flyeva.models.eva import encoder_flops, get_size, size_with
from flyeva.tasks.clip.config import ClipConfig
from flyeva.tasks.clip.model import build_clip, clip_param_groups
from flyeva.tasks.clip.objective import ClipObjective
from flyeva.tasks.clip.zeroshot import tokenizer_for


def text_flops(width: int, layers: int, context: int, mlp_ratio: float, embed_dim: int) -> int:
    """Forward FLOPs of one caption through the text tower (full context, as the causal mask keeps it)."""
    mlp = int(width * mlp_ratio)
    per_layer = 2 * context * width * (3 * width + width + 2 * mlp) + 2 * 2 * context * context * width
    return layers * per_layer + 2 * width * embed_dim


def measure(recipe: str, args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cfg = load_config(ClipConfig, recipe_path("clip", recipe), [])
    torch.manual_seed(0)
    with device:  # initialise on the device: EVA-g's init takes minutes on a CPU
        model = build_clip(cfg.model)
    groups = clip_param_groups(model, cfg.model.vision, cfg.model.text, cfg.optim.lr, cfg.optim.weight_decay)
    optimizer = build_adamw(groups, cfg.optim)
    objective = ClipObjective(tokenizer_for(cfg.model.text.context_length), args.micro_batch)
    size = get_size(cfg.model.vision.size)
    if cfg.model.vision.img_size:
        size = size_with(size, img_size=cfg.model.vision.img_size)
    images = torch.randn(args.batch, 3, size.img_size, size.img_size, device=device)
    texts = [
        f"a photo of object number {i} in a {('red', 'green', 'blue')[i % 3]} room" for i in range(args.batch)
    ]
    autocast_dtype = DTYPES[args.precision] if args.precision != "fp32" else None
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    class Context:
        @staticmethod
        def backward(loss: torch.Tensor) -> None:
            scaler.scale(loss).backward()

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            objective(model, {"images": images, "texts": texts}, Context())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    text = cfg.model.text
    vision_fwd = encoder_flops(size) + 2 * size.embed_dim * cfg.model.embed_dim
    text_fwd = text_flops(text.width, text.layers, text.context_length, text.mlp_ratio, cfg.model.embed_dim)
    per_pair = 3 * (vision_fwd + text_fwd)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return dict(
        recipe=recipe,
        vision=cfg.model.vision.size,
        text=f"{text.layers}x{text.width}",
        batch=args.batch,
        step_s=seconds,
        pairs_per_s=args.batch / seconds,
        gflops_per_pair=per_pair / 1e9,
        vision_share=vision_fwd / (vision_fwd + text_fwd),
        achieved_gflops=args.batch * per_pair / seconds / 1e9,
        peak_mib=memory,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--recipes", default="miniature,eva_clip_base", help="comma-separated configs/clip names"
    )
    parser.add_argument("--batch", type=int, default=8, help="pairs per step (one process)")
    parser.add_argument("--micro-batch", type=int, default=0, help="cached-feature micro-batch (0 = off)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [measure(name.strip(), args) for name in args.recipes.split(",") if name.strip()]
    ceiling = matmul_gflops(args.matmul_size, device=args.device, dtype=DTYPES[args.precision])
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
        f"precision {args.precision}, micro-batch {args.micro_batch or 'off'}"
    )
    print(f"matmul ceiling ({args.precision}, {args.matmul_size}^2): {ceiling:.1f} GFLOP/s")
    print(
        f"{'recipe':>16} {'vision':>10} {'text':>7} {'batch':>5} {'s/step':>7} {'pairs/s':>8} "
        f"{'GFLOP/pair':>10} {'vision %':>8} {'GFLOP/s':>8} {'% ceil':>6} {'peak MiB':>9}"
    )
    for row in rows:
        share = 100 * row["achieved_gflops"] / ceiling
        print(
            f"{row['recipe']:>16} {row['vision']:>10} {row['text']:>7} {row['batch']:>5} "
            f"{row['step_s']:>7.3f} {row['pairs_per_s']:>8.1f} {row['gflops_per_pair']:>10.3f} "
            f"{100 * row['vision_share']:>7.0f}% {row['achieved_gflops']:>8.1f} {share:>5.0f}% "
            f"{row['peak_mib']:>9.0f}"
        )


if __name__ == "__main__":
    main()
