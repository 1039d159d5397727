"""Does a from-scratch miniature ViT leave its loss plateau on ShapeWorld? (docs/demo.md)

Trains `build_classifier("miniature")` with plain AdamW (lr 1e-3 constant after 20 warmup steps,
batch 64, no augmentation) on cached ShapeWorld tensors and prints validation top-1 every 100
steps. Flags undo one fix at a time, to reproduce the table in docs/demo.md:

    python benchmarks/miniature_plateau.py                      # the shipped world and init
    python benchmarks/miniature_plateau.py --init pretrain      # MIM init: std-0.015 patch embedding
    python benchmarks/miniature_plateau.py --init cut           # fine-tuning init cut at +-1 std
    python benchmarks/miniature_plateau.py --timm-vit           # timm's VisionTransformer, same size
    python benchmarks/miniature_plateau.py --mid-grey           # backgrounds grey 50-170
    python benchmarks/miniature_plateau.py --free-rotation      # shapes at any angle
    python benchmarks/miniature_plateau.py --small              # class object radius 0.11-0.15
    python benchmarks/miniature_plateau.py --world "LARGEST_SIZE=(0.2, 0.25)"  # any ShapeWorld constant
    python benchmarks/miniature_plateau.py --head-scale 0.001   # the release's head init scale
    python benchmarks/miniature_plateau.py --lr 3e-3 --warmup 100 --batch 128 --seed 1

One CPU thread: about 120 s for 600 steps on this project's machine; measured rows in docs/demo.md.
"""

from __future__ import annotations

import argparse
import ast
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import flyeva.data.synthetic as shapeworld
from flyeva.models.eva import init_release_weights
from flyeva.tasks.classify.model import build_classifier

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def scenes(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    world = shapeworld.ShapeWorld(image_size=32, seed=seed)
    images = np.stack([np.asarray(world.render(index)) for index in range(count)])
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (pixels - CLIP_MEAN) / CLIP_STD, torch.tensor([world.label(i) for i in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--task", choices=("full", "shape", "quadrant"), default="full")
    parser.add_argument("--init", choices=("finetune", "pretrain", "cut"), default="finetune")
    parser.add_argument("--head-scale", type=float, default=1.0)
    parser.add_argument("--mid-grey", action="store_true")
    parser.add_argument("--free-rotation", action="store_true")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--world", nargs="*", default=[], metavar="NAME=VALUE")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--timm-vit", action="store_true")
    args = parser.parse_args()
    if args.mid_grey:
        shapeworld.BACKGROUND_GREY = (50, 170)
    if args.free_rotation:
        shapeworld.MAX_TILT = math.pi
    if args.small:
        shapeworld.LARGEST_SIZE = (0.11, 0.15)
    for assignment in args.world:
        name, value = assignment.split("=", 1)
        setattr(shapeworld, name, ast.literal_eval(value))
    torch.manual_seed(args.seed)
    train_x, train_y = scenes(0, 16384)
    val_x, val_y = scenes(1, 1024)
    if args.task != "full":
        train_y, val_y = (train_y // 4, val_y // 4) if args.task == "shape" else (train_y % 4, val_y % 4)
    model = build_classifier("miniature", int(train_y.max()) + 1, head_init_scale=args.head_scale)
    if args.timm_vit:
        import timm.models.vision_transformer as vit

        model = vit.VisionTransformer(  # the known-good reference: timm's ViT and init, same size
            img_size=32,
            patch_size=4,
            embed_dim=96,
            depth=4,
            num_heads=3,
            mlp_ratio=4,
            num_classes=int(train_y.max()) + 1,
            global_pool="avg",
            fc_norm=True,
        )
    if args.init == "pretrain":  # the MIM model's init (std 0.015, patch embedding included)
        init_release_weights(model)
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02 * args.head_scale)
    if args.init == "cut":  # the fine-tuning init cut at +-1 std, as flyeva had it before
        init_release_weights(model, std=0.02, patch_embed=False)
        torch.nn.init.trunc_normal_(model.head.weight, std=0.02 * args.head_scale)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    batches = torch.Generator().manual_seed(args.seed)
    started, curve = time.time(), []
    for step in range(args.steps + 1):
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                curve.append(f"{step}:{100 * (model(val_x).argmax(1) == val_y).float().mean():.1f}")
            model.train()
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        index = torch.randint(0, len(train_x), (args.batch,), generator=batches)
        loss = F.cross_entropy(model(train_x[index]), train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"{vars(args)}  val top-1 by step: {' '.join(curve)}  ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
