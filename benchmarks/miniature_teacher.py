"""Does the miniature CLIP teacher learn ShapeWorld's classes? (docs/demo.md)

Trains the `clip/miniature` architecture (EVA miniature vision tower, 2-layer text tower) with a
bare contrastive loop on cached ShapeWorld tensors: AdamW (0.9, 0.98), weight decay 0.05, vision
lr 1e-3 after 16 linear warmup steps, batch 64, no augmentation. Every 100 steps it prints the
loss, the zero-shot top-1 on 500 held-out scenes ("a large {class}") and the mean pairwise cosine
of image and text features (1.0 = collapsed to one direction). Flags reproduce docs/demo.md's rows:

    python benchmarks/miniature_teacher.py                    # the shipped setting: text lr 1e-4
    python benchmarks/miniature_teacher.py --text-lr 1e-3     # the text tower at the full lr
    python benchmarks/miniature_teacher.py --text-lr 0        # a frozen random text tower
    python benchmarks/miniature_teacher.py --captions scene   # the old captions: + small shapes, relations

One CPU thread: 190-238 s for 800 steps on this project's machine, two runs side by side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from flyeva.config import load_config, recipe_path
from flyeva.data.synthetic import ShapeWorld
from flyeva.tasks.clip.config import ClipConfig
from flyeva.tasks.clip.init_weights import build_clip_from_config
from flyeva.tasks.clip.zeroshot import tokenizer_for

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def scene_caption(world: ShapeWorld, index: int) -> str:
    """The longer caption (the class, then each small shape's place), measured against the class-only one."""
    objects = world.sample(index).objects
    largest = max(objects, key=lambda obj: obj["size"])
    parts = [world.caption(index)]
    for obj in objects:
        if obj is not largest:
            dx, dy = (obj["position"][k] - largest["position"][k] for k in (0, 1))
            relation = (
                ("right of" if dx > 0 else "left of")
                if abs(dx) >= abs(dy)
                else ("below" if dy > 0 else "above")
            )
            parts.append(f"a small {obj['shape']} {relation} the {largest['shape']}")
    return ", ".join(parts)


def scenes(seed: int, count: int, captions: str) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    world = ShapeWorld(image_size=32, seed=seed)
    images = np.stack([np.asarray(world.render(index)) for index in range(count)])
    pixels = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - CLIP_MEAN) / CLIP_STD
    texts = [scene_caption(world, i) if captions == "scene" else world.caption(i) for i in range(count)]
    return pixels, texts, torch.tensor([world.label(i) for i in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--text-lr", type=float, default=1e-4)
    parser.add_argument("--captions", choices=("class", "scene"), default="class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_images, captions, _ = scenes(0, 2048, args.captions)
    val_images, _, val_labels = scenes(1000, 500, "class")
    cfg = load_config(ClipConfig, recipe_path("clip", "miniature"), ["model.text.context_length=40"])
    torch.manual_seed(args.seed)
    model = build_clip_from_config(cfg.model)
    tokenize = tokenizer_for(cfg.model.text.context_length)
    tokens = tokenize(captions)
    prompts = tokenize([f"a large {name}" for name in ShapeWorld(image_size=32).class_names])
    text = [p for n, p in model.named_parameters() if n.startswith("text.")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("text.")]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "peak": 1e-3}, {"params": text, "peak": args.text_lr}],
        weight_decay=0.05, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    print("| step | loss | zero-shot top-1 | image cosine | text cosine |\n|---|---|---|---|---|")
    for step in range(1, args.steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = group["peak"] * min(1.0, step / 16)
        batch = torch.randint(0, len(captions), (64,), generator=generator)
        image_features, text_features, scale = model(train_images[batch], tokens[batch])
        logits = scale * image_features @ text_features.T
        targets = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        if step % 100 == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                image_features, text_features, _ = model(val_images, prompts)
                top1 = ((image_features @ text_features.T).argmax(1) == val_labels).float().mean()
                image_cos = (image_features @ image_features.T).mean()
                text_cos = (text_features @ text_features.T).mean()
            model.train()
            print(f"| {step} | {loss.item():.4f} | {100 * top1:.1f}% | {image_cos:.4f} | {text_cos:.4f} |")
    seconds = time.time() - started
    print(f"{args.steps} steps in {seconds:.0f} s (text lr {args.text_lr}, {args.captions} captions)")


if __name__ == "__main__":
    main()
