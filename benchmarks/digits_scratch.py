"""Does `classify/miniature` learn from scratch as well as a plain loop? (docs/classify.md)

Two data sets at 32 px, the same model (`miniature`) and budget for both trainers:
- `--data digits`: scikit-learn's `load_digits` (1,797 8x8 handwritten digits, 10 classes;
  `pip install scikit-learn`), exported as an ImageFolder upscaled to 32 px (nearest: one digit pixel
  per 4x4 patch), white on black, with a fixed split (seed 0): 1,438 training and 359 validation
  images; 10 epochs at batch 64 = 220 steps (`data.root` of the recipe);
- `--data shapeworld`: the recipe's own ShapeWorld splits (9,600 training scenes, seed 0; 512
  validation scenes, seed 1); 4 epochs = 600 steps.

The trainer is either a plain AdamW loop on cached tensors (lr 1e-3 constant after 20 warmup steps,
weight decay 0.05 on every weight, no layer decay, head scale 1, EMA or augmentation, shuffled
epochs) or `flyeva classify finetune` itself, with overrides that add one release ingredient each:

    python benchmarks/digits_scratch.py --export runs/digits          # write the ImageFolder only
    python benchmarks/digits_scratch.py --plain                       # the plain loop on digits
    python benchmarks/digits_scratch.py                               # the shipped recipe on digits
    python benchmarks/digits_scratch.py -- model.head_init_scale=0.001   # + one ingredient
    python benchmarks/digits_scratch.py --data shapeworld --plain --seed 1
    python benchmarks/digits_scratch.py --data shapeworld --plain --engine-groups  # no decay on norms...

Prints one JSON line: validation top-1 at the end (and the best epoch's, and EMA's when on).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VAL_FRACTION = 0.2


def export_digits(root: Path) -> Path:
    """`root/train/<digit>/*.png` and `root/val/<digit>/*.png`, 32 px RGB; kept when already there."""
    from sklearn.datasets import load_digits

    if (root / "val").is_dir():
        return root
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    num_val = round(VAL_FRACTION * len(order))
    for rank, index in enumerate(order):
        split = "val" if rank < num_val else "train"
        pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)
        image = Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB")
        folder = root / split / str(digits.target[index])
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.png")
    return root


def folder_tensors(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of an ImageFolder split, CLIP-normalised, with its class index (sorted names)."""
    from flyeva.data.transforms import CLIP_MEAN, CLIP_STD

    classes = sorted(p.name for p in folder.iterdir())
    files = [(f, label) for label, name in enumerate(classes) for f in sorted((folder / name).glob("*.png"))]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor([label for _, label in files])


def shapeworld_tensors(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's ShapeWorld source (`type: shapeworld, image_size: 32`) as normalised tensors."""
    from flyeva.data.synthetic import ShapeWorld
    from flyeva.data.transforms import CLIP_MEAN, CLIP_STD

    world = ShapeWorld(image_size=32, seed=seed)
    pixels = np.stack([np.asarray(world.render(index)) for index in range(count)])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std, torch.tensor([world.label(index) for index in range(count)])


def plain_loop(train: tuple, val: tuple, epochs: int, seed: int, engine_groups: bool) -> dict[str, float]:
    """The reference: constant lr 1e-3 after 20 warmup steps, no layer decay, EMA or augmentation."""
    from flyeva.engine.optim import param_groups, without_names
    from flyeva.tasks.classify.model import build_classifier

    (train_x, train_y), (val_x, val_y) = train, val
    torch.manual_seed(seed)
    model = build_classifier("miniature", int(train_y.max()) + 1, head_init_scale=1.0)
    # engine_groups: the engine's weight decay groups (none on norms, biases, pos_embed, cls_token)
    groups = without_names(param_groups(model, 0.05)) if engine_groups else model.parameters()
    optimizer = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05)
    steps_per_epoch = len(train_x) // 64
    best = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(train_x))
        model.train()
        for step in range(steps_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * min(1.0, (epoch * steps_per_epoch + step + 1) / 20)
            index = order[step * 64 : (step + 1) * 64]
            loss = F.cross_entropy(model(train_x[index]), train_y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            top1 = 100 * (model(val_x).argmax(1) == val_y).float().mean().item()
        best = max(best, top1)
    return {"top1": top1, "best_top1": best}


def recipe_run(root: Path | None, recipe: str, epochs: int, seed: int, overrides: list[str]) -> dict:
    """`flyeva classify finetune --config RECIPE [data.root=ROOT] ...` through the real stage."""
    from flyeva.config import load_config, recipe_path
    from flyeva.engine.stage import run_stage
    from flyeva.tasks.classify import FINETUNE
    from flyeva.tasks.classify.finetune import FinetuneConfig

    tag = hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8]  # one folder per setting
    data = "digits" if root else "shapeworld"
    output = Path("runs/digits_scratch") / f"{data}_{recipe}_{epochs}_{seed}_{tag}"
    settings = [
        *([f"data.root={root}"] if root else []),
        f"train.epochs={epochs}",
        f"train.seed={seed}",
        f"train.output_dir={output}",
        "train.device=cpu",
        "train.num_workers=0",
        "train.progress=false",
        "train.tensorboard=false",
        *overrides,
    ]
    summary = run_stage(FINETUNE, load_config(FinetuneConfig, recipe_path("classify", recipe), settings))
    result = {"top1": summary["final"]["top1"], "best_top1": summary["best"]["top1"]}
    if "ema_top1" in summary["final"]:
        result["ema_top1"] = summary["final"]["ema_top1"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("digits", "shapeworld"), default="digits")
    parser.add_argument("--root", type=Path, default=Path("runs/digits"), help="where the digits live")
    parser.add_argument("--export", type=Path, default=None, help="write the digits ImageFolder; stop")
    parser.add_argument("--plain", action="store_true", help="the plain loop instead of the recipe")
    parser.add_argument("--engine-groups", action="store_true", help="plain loop: the engine's decay groups")
    parser.add_argument("--config", default="miniature", help="the classify recipe")
    parser.add_argument("--epochs", type=int, default=0, help="default: 10 (digits), 4 (shapeworld)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="key=value for the recipe (after --)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.export:
        print(f"wrote {export_digits(args.export)}")
        return
    digits = args.data == "digits"
    root = export_digits(args.root) if digits else None
    epochs = args.epochs or (10 if digits else 4)
    started = time.time()
    if args.plain and digits:
        train, val = folder_tensors(root / "train"), folder_tensors(root / "val")
        result = plain_loop(train, val, epochs, args.seed, args.engine_groups)
    elif args.plain:
        train, val = shapeworld_tensors(0, 9600), shapeworld_tensors(1, 512)
        result = plain_loop(train, val, epochs, args.seed, args.engine_groups)
    else:
        result = recipe_run(root, args.config, epochs, args.seed, args.overrides)
    setting = (
        f"plain loop{' (engine groups)' * args.engine_groups}"
        if args.plain
        else f"--config {args.config} {' '.join(args.overrides)}".strip()
    )
    line = {"data": args.data, "setting": setting, "seed": args.seed, **result}
    print(json.dumps(line | {"seconds": round(time.time() - started)}))


if __name__ == "__main__":
    main()
