"""Which part of the pixel-MIM encoder costs the miniature fine-tune: fine-tune from it with its blocks,
its embeddings (patch kernel, position table, CLS) or its patch kernel alone replaced by the random
arm's init.

    python benchmarks/pixel_parts.py [--out runs/demo] [--seeds 1] [--parts blocks,embeddings,patch_embed]
    python benchmarks/pixel_parts.py --source eva --parts patch_embed --seeds ""  # the encoder only

Writes OUT/SOURCE_parts/fresh_PART/ (the mixed encoder) and OUT/SOURCE_parts/finetune_fresh_PART_seedS
(the demo's fine-tune, `configs/classify/miniature.yaml`, 448 steps) and prints each top-1.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flyeva.models.eva import build_encoder, get_size
from flyeva.models.weights import load, save_weights
from flyeva.tasks.demo.pipeline import FULL, _stage, finetune

EMBEDDINGS = ("patch_embed.", "pos_embed", "cls_token")


def mixed_encoder(pixel_final: Path, fresh: str, folder: Path) -> Path:
    """The pixel-MIM encoder with `fresh` (blocks | embeddings | patch_embed) from the random arm's init
    (seed 0)."""
    pixel = load(pixel_final, kind="encoder").state_dict()
    torch.manual_seed(0)
    random_init = build_encoder(get_size("miniature")).state_dict()
    prefixes = {"blocks": ("blocks.",), "embeddings": EMBEDDINGS, "patch_embed": ("patch_embed.",)}[fresh]
    state = {k: random_init[k] if k.startswith(prefixes) else v for k, v in pixel.items()}
    save_weights(state, folder, kind="encoder", arch={"size": get_size("miniature").__dict__})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--parts", default="blocks,embeddings")
    parser.add_argument("--source", default="pixel", choices=("pixel", "eva"), help="the MIM arm to mix")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(args.out) / f"{args.source}_parts"
    for part in args.parts.split(","):
        init = root / f"fresh_{part}"
        if not init.exists():
            mixed_encoder(Path(args.out) / args.source / "final", part, init)
        for seed in (int(s) for s in args.seeds.split(",") if s):
            result = _stage(root / f"finetune_fresh_{part}_seed{seed}", finetune, str(init), seed, FULL)
            print(f"pixel MIM with fresh {part}, seed {seed}: top-1 {result['top1']:.2f}", flush=True)


if __name__ == "__main__":
    main()
