"""Which half of inflation costs the miniature video task: the random arm's from-scratch video model
with its position table tiled over time (`table`) or its tubelet kernel made equal over the tubelet's
frames (`kernel`, the mean of its time slices in each), written as video weights folders that
`benchmarks/demo_tasks.py --init` trains as the random arm (docs/demo.md, video).

    python benchmarks/video_inflation.py [--out runs/demo]
    python benchmarks/demo_tasks.py --init runs/demo/video_inflation/table \\
        --video-ablation scratch_tiled_table=model.drop_path_rate=0 video:eva:0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flyeva.config import load_config, recipe_path
from flyeva.models.weights import save_weights
from flyeva.tasks.video.build import build_model
from flyeva.tasks.video.config import VideoConfig
from flyeva.tasks.video.model import video_arch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    out = Path(parser.parse_args().out)
    classes = (out / "video_data" / "train" / "classes.txt").read_text().splitlines()
    classes = [name for name in classes if name.strip()]
    recipe = load_config(VideoConfig, recipe_path("video", "miniature"))
    for change in ("table", "kernel"):
        model = build_model(recipe.model, classes, seed=0)  # the random arm's init at seed 0
        with torch.no_grad():
            if change == "table":
                slot = model.patch_embed.grid_size[0] * model.patch_embed.grid_size[1]
                first = model.pos_embed[:, 1 : 1 + slot]
                model.pos_embed[:, 1:] = first.repeat(1, model.patch_embed.time_slots, 1)
            else:
                kernel = model.patch_embed.proj.weight
                kernel.copy_(kernel.mean(2, keepdim=True).expand_as(kernel))
        folder = out / "video_inflation" / change
        save_weights(model, folder, kind="video", arch=video_arch(model), extra={"classes": classes})
        print(f"{change}: {folder}")


if __name__ == "__main__":
    main()
