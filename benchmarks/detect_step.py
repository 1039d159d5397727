"""Images/s, the backbone's share of the matmul ceiling and peak memory of one detection training step.

One step = EVA ViTDet backbone (windowed blocks, decomposed rel-pos through SDPA) + simple pyramid +
RPN + 3-stage cascade + mask head + their losses + backward + AdamW over the release's layer-decay
groups, i.e. `flyeva detect train`'s step (docs/detect.md), on synthetic images with 8 objects each.
The time is split into the backbone (ViT + pyramid forward and backward, timed alone on the same
input), the heads (the rest of forward + backward) and the optimizer step.

    python benchmarks/detect_step.py                                     # miniature@64 and eva_base@1024, CPU
    python benchmarks/detect_step.py --configs eva_base@1024,eva_base@1280,eva_base@1536 --steps 1
    python benchmarks/detect_step.py --device cuda --configs eva_giant@1280 --grad-checkpointing
    python benchmarks/detect_step.py --backbone-only --rel-pos mask,channels --configs eva_base@1024

`--rel-pos mask` runs the global blocks' decomposed rel-pos as SDPA's [heads, N, N] float mask (the
explicit form); `channels` (flyeva's) as extra query/key channels with no mask; a comma list runs
both, in one run, each in its own process. `--backbone-only` times the ViT + pyramid step alone.

Backbone FLOPs per image (forward; x3 with backward): patch embedding, qkv/proj/MLP linears, q.k and
attn.v over each block's window (or the whole grid in global blocks), and the rel-pos einsums.
Each config runs in a fresh process so that peak memory (CPU `ru_maxrss`, CUDA
`max_memory_allocated`) is that config's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from matmul_ceiling import DTYPES, matmul_gflops, peak_memory_mib, sync

from flyeva.config import load_config, recipe_path
from flyeva.engine.optim import build_adamw
from flyeva.tasks.detect.build import build_detector, release_param_groups
from flyeva.tasks.detect.config import DetectConfig


def backbone_flops(net, img_size: int) -> float:
    """Forward FLOPs of the ViT part for one image (2 per multiply-add)."""
    grid = img_size // net.patch_size
    tokens, dim = grid * grid, net.embed_dim
    mlp = net.blocks[0].mlp.fc1.out_features
    flops = 2 * tokens * dim * 3 * net.patch_size**2
    for block in net.blocks:
        keys = tokens if block.window == 0 else block.window**2
        queries = tokens if block.window == 0 else -((-grid // block.window) ** 2) * block.window**2
        side = grid if block.window == 0 else block.window
        flops += 2 * tokens * dim * (4 * dim + 2 * mlp)  # qkv, proj, fc1, fc2
        flops += 2 * 2 * queries * keys * dim  # q.k and attn.v
        flops += 2 * queries * 2 * side * dim  # q.Rh and q.Rw
    return float(flops)


def synthetic_batch(batch: int, img_size: int, device: torch.device, objects: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, img_size, img_size, generator=generator) * 255).to(device)
    targets = []
    for _ in range(batch):
        corner = torch.rand(objects, 2, generator=generator) * img_size * 0.7
        side = img_size * (0.05 + 0.25 * torch.rand(objects, 2, generator=generator))
        boxes = torch.cat([corner, (corner + side).clamp(max=img_size - 1)], 1).floor()
        masks = torch.zeros(objects, img_size, img_size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[k, y0:y1, x0:x1] = True
        labels = torch.randint(0, 80, (objects,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device), "masks": masks.to(device)})
    return images, targets


def explicit_bias_attention(q, k, v, rel_pos_h, rel_pos_w, hw, interp="linear"):
    """The rel-pos bias as SDPA's float mask: the [B, heads, N, N] tensor the channel form avoids."""
    from flyeva.tasks.detect.backbone import decomposed_rel_pos_bias

    bias = decomposed_rel_pos_bias(q, rel_pos_h, rel_pos_w, hw, interp).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def measure(config: str, args: argparse.Namespace) -> dict:
    if args.rel_pos == "mask":
        import flyeva.tasks.detect.backbone as backbone

        backbone.rel_pos_attention = explicit_bias_attention
    size, img_size = config.split("@")
    img_size = int(img_size)
    device = torch.device(args.device)
    recipe = "miniature" if size == "miniature" else "eva_base_coco"
    overrides = [f"model.size={size}", f"model.img_size={img_size}", "model.drop_path_rate=0.1",
                 f"model.grad_checkpointing={str(args.grad_checkpointing).lower()}"]  # fmt: skip
    cfg = load_config(DetectConfig, recipe_path("detect", recipe), overrides)
    torch.manual_seed(0)
    detector = build_detector(cfg, num_classes=80).to(device).train()
    optimizer = build_adamw(release_param_groups(detector, cfg.optim), cfg.optim)
    autocast = DTYPES[args.precision] if args.precision != "fp32" else None
    images, targets = synthetic_batch(args.batch, img_size, device)
    sizes = [(img_size, img_size)] * args.batch

    def full_step() -> tuple[float, float]:
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            losses = detector(images, targets, sizes)
        sum(losses.values()).backward()
        sync(device)
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        return middle - start, time.perf_counter() - middle

    def backbone_step() -> float:
        normalized = detector.preprocess(images, sizes).tensors
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            features = detector.backbone(normalized)
        sum(f.float().mean() for f in features.values()).backward()
        sync(device)
        detector.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if args.backbone_only:
        backbone_s = statistics.median(backbone_step() for _ in range(args.warmup + args.steps))
        flops = 3 * backbone_flops(detector.backbone.net, img_size) * args.batch
        return dict(
            config=config, rel_pos=args.rel_pos, batch=args.batch, step_s=float("nan"),
            images_per_s=float("nan"), backbone_s=backbone_s, heads_s=float("nan"), optimizer_s=float("nan"),
            backbone_gflops=flops / backbone_s / 1e9, peak_mib=peak_memory_mib(device),
        )  # fmt: skip
    for _ in range(args.warmup):
        full_step()
    steps = [full_step() for _ in range(args.steps)]
    backbone_s = statistics.median(backbone_step() for _ in range(args.steps))
    forward_backward_s = statistics.median(s[0] for s in steps)
    optimizer_s = statistics.median(s[1] for s in steps)
    step_s = forward_backward_s + optimizer_s
    flops = 3 * backbone_flops(detector.backbone.net, img_size) * args.batch
    return dict(
        config=config, rel_pos=args.rel_pos, batch=args.batch, step_s=step_s,
        images_per_s=args.batch / step_s,
        backbone_s=backbone_s, heads_s=max(0.0, forward_backward_s - backbone_s), optimizer_s=optimizer_s,
        backbone_gflops=flops / backbone_s / 1e9, peak_mib=peak_memory_mib(device),
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="miniature@64,eva_base@1024", help="SIZE@PIXELS, comma-separated"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precision", choices=sorted(DTYPES), default=None, help="default: fp32 CPU, bf16 CUDA"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", action="store_true", help="one JSON row per config, no ceiling")
    parser.add_argument("--rel-pos", default="channels", help="channels | mask | channels,mask (both)")
    parser.add_argument("--backbone-only", action="store_true", help="time the ViT + pyramid step alone")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if args.json:
        for config in configs:
            print(json.dumps(measure(config, args)), flush=True)
        return
    load_before = os.getloadavg()[0]
    rows = []
    for config in configs:
        for rel_pos in args.rel_pos.split(","):
            command = [sys.executable, __file__, "--json", "--configs", config, "--rel-pos", rel_pos]
            for key in ("batch", "steps", "warmup", "device", "precision", "threads"):
                command += [f"--{key}", str(getattr(args, key))]
            command += ["--grad-checkpointing"] if args.grad_checkpointing else []
            command += ["--backbone-only"] if args.backbone_only else []
            result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            if result.returncode != 0:  # e.g. killed for memory: the row says so, the others still run
                rows.append(dict(config=config, rel_pos=rel_pos, failed=result.returncode))
                continue
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    ceiling = matmul_gflops(args.matmul_size, device=args.device, dtype=DTYPES[args.precision])
    print(f"torch {torch.__version__}, {args.device}, {args.precision}, {torch.get_num_threads()} threads, "
          f"grad checkpointing {args.grad_checkpointing}")  # fmt: skip
    print(f"matmul ceiling: {ceiling:.1f} GFLOP/s")
    print(f"{'config':>15} {'rel-pos':>8} {'batch':>5} {'s/step':>7} {'img/s':>6} {'backbone s':>10} "
          f"{'heads s':>8} {'optim s':>7} {'bb GFLOP/s':>10} {'bb %ceil':>8} {'peak MiB':>8}")  # fmt: skip
    for row in rows:
        if "failed" in row:
            print(f"{row['config']:>15} {row['rel_pos']:>8} failed with exit code {row['failed']} (memory?)")
            continue
        print(f"{row['config']:>15} {row['rel_pos']:>8} {row['batch']:>5} {row['step_s']:>7.2f} "
              f"{row['images_per_s']:>6.3f} "
              f"{row['backbone_s']:>10.2f} {row['heads_s']:>8.2f} {row['optimizer_s']:>7.2f} "
              f"{row['backbone_gflops']:>10.1f} {100 * row['backbone_gflops'] / ceiling:>7.0f}% "
              f"{row['peak_mib']:>8.0f}")  # fmt: skip
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
