"""What the demo's encoders look like to the task stages: layer ids, input statistics, frame order.

Prints, for the demo's pretrained encoders in OUT (default runs/demo; `flyeva demo` writes them):
1. the layer id and lr scale of every parameter group of the three task models at layer decay 0.9;
2. how the EVA encoder's features change when ShapeWorld images are normalised with ImageNet's
   statistics (the task stages, as the release) instead of CLIP's (its pretraining);
3. how much an inflated video model's features change when a clip's frames are reversed, at
   initialisation, for random init and for EVA with and without the temporal position term;
4. per encoder (EVA, pixel MIM, random init), the mean pairwise cosine of mean-pooled features over
   ShapeWorld images (1.0: every image looks alike), and what a ridge probe on those features reads
   on held-out scenes: the class (20, chance 5%), its shape (20%) and quadrant (25%), and the largest
   object's colour (8 colours; ShapeWorld
   makes independent of the class); a ridge probe on each patch token for the shape under it
   (background or one of 5 shapes); and the rms of its block weights and of its patch kernel.

    python benchmarks/demo_audit.py [--out runs/demo]
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from flyeva.config import load_config, recipe_path
from flyeva.engine.optim import layer_decay_groups


def layer_ids() -> None:
    from flyeva.tasks.detect import demo as detect_demo
    from flyeva.tasks.detect.build import build_detector, release_param_groups
    from flyeva.tasks.detect.config import DetectConfig
    from flyeva.tasks.segment import demo as segment_demo
    from flyeva.tasks.segment.config import SegmentConfig
    from flyeva.tasks.segment.model import build_segmenter
    from flyeva.tasks.video.build import build_model
    from flyeva.tasks.video.config import VideoConfig

    seg = load_config(SegmentConfig, recipe_path("segment", "miniature"), segment_demo.DEMO_OVERRIDES)
    det = load_config(DetectConfig, recipe_path("detect", "miniature"), detect_demo.DEMO_OVERRIDES)
    vid = load_config(VideoConfig, recipe_path("video", "miniature"))
    for cfg in (seg, det, vid):
        cfg.optim.layer_decay = 0.9
    models = {
        "segment": (build_segmenter(seg.model, 6, 32), lambda m: layer_decay_groups(m, seg.optim)),
        "detect": (build_detector(det, 5), lambda m: release_param_groups(m, det.optim)),
        "video": (build_model(vid.model, list("abcdefgh")), lambda m: layer_decay_groups(m, vid.optim)),
    }
    for task, (model, groups_fn) in models.items():
        layers: dict[int, list] = defaultdict(lambda: [0, 0.0, []])
        for group in groups_fn(model):
            entry = layers[group["layer_id"]]
            entry[0] += len(group["params"])
            entry[1] = group["lr_scale"]
            entry[2] += group["param_names"]
        print(f"{task}: layer id: tensors, lr scale, first name")
        for layer, (count, scale, names) in sorted(layers.items()):
            print(f"  {layer}: {count}, {scale:.3f}, {names[0]}")


def scenes(count: int, seed: int = 999) -> tuple[torch.Tensor, ...]:
    """Images [N, 3, 32, 32] in [0, 1], class labels, the largest object's colour index, and each
    4 x 4 patch's semantic label (its centre pixel's: 0 background, else the shape) [N, 64]."""
    from flyeva.data.synthetic import COLOURS, ShapeWorld

    world = ShapeWorld(image_size=32, seed=seed)
    pixels, labels, colours, semantic = [], [], [], []
    for index in range(count):
        scene = world.sample(index)
        semantic.append(torch.from_numpy(scene.semantic[2::4, 2::4].astype(np.int64)).flatten())
        pixels.append(torch.from_numpy(np.asarray(scene.image, dtype=np.float32)))
        labels.append(scene.label)
        largest = max(scene.objects, key=lambda obj: obj["size"])
        colours.append(list(COLOURS).index(largest["colour"]))
    images = torch.stack(pixels).permute(0, 3, 1, 2) / 255
    return images, torch.tensor(labels), torch.tensor(colours), torch.stack(semantic)


def ridge_probe(train: torch.Tensor, train_y: torch.Tensor, val: torch.Tensor, val_y: torch.Tensor) -> float:
    """Top-1 (%) of a closed-form ridge classifier (one-hot targets) on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    x, v = (train - mean) / std, (val - mean) / std
    x, v = torch.cat([x, torch.ones(len(x), 1)], 1), torch.cat([v, torch.ones(len(v), 1)], 1)
    targets = F.one_hot(train_y).float()
    weights = torch.linalg.solve(x.T @ x + 10.0 * torch.eye(x.shape[1]), x.T @ targets)
    return 100.0 * ((v @ weights).argmax(1) == val_y).float().mean().item()


def normalise(batch: torch.Tensor, stats: str) -> torch.Tensor:
    from flyeva.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

    mean, std = (CLIP_MEAN, CLIP_STD) if stats == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return (batch - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@torch.no_grad()
def pooled(encoder: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    tokens = encoder.forward_features(batch)  # after the final norm
    return tokens[:, encoder.num_prefix_tokens :].mean(1)


def encoders(out: Path) -> dict[str, torch.nn.Module]:
    from flyeva.models.eva import build_encoder, get_size
    from flyeva.models.weights import load

    torch.manual_seed(0)
    found = {"random init": build_encoder(get_size("miniature")).eval()}
    for name, folder in (("EVA", "eva"), ("pixel MIM", "pixel")):
        if (out / folder / "final").exists():
            found[name] = load(out / folder / "final", kind="encoder").eval()
    return found


@torch.no_grad()
def frame_order(out: Path) -> None:
    from flyeva.data.synthetic import ShapeWorld
    from flyeva.tasks.video.build import build_model
    from flyeva.tasks.video.config import VideoConfig

    world = ShapeWorld(image_size=32, seed=1, num_frames=8)
    clips = []
    for index in range(32):
        frames = [
            torch.tensor(list(f.getdata()), dtype=torch.float32).view(32, 32, 3)
            for f in world.clip(index).frames
        ]
        clips.append(torch.stack(frames).permute(0, 3, 1, 2) / 255)
    batch = normalise(torch.stack(clips).flatten(0, 1), "imagenet").view(32, 8, 3, 32, 32)
    arms = {
        "random init": ("", 0.0, 0.0),
        "EVA, tiled table": ("eva", 0.0, 0.0),
        "EVA + temporal term": ("eva", 0.02, 0.0),
        "EVA + temporal and tubelet motion terms (the demo's EVA arm)": ("eva", 0.02, 1.0),
    }
    for name, (folder, std, motion) in arms.items():
        if folder and not (out / folder / "final").exists():
            continue
        overrides = [
            f"model.init='{out / folder / 'final' if folder else ''}'",
            f"model.temporal_pos_std={std}",
            f"model.tubelet_motion={motion}",
        ]
        model = build_model(
            load_config(VideoConfig, recipe_path("video", "miniature"), overrides).model, list("abcdefgh")
        )
        model.eval()
        features = model.forward_head(model.forward_features(batch), pre_logits=True)
        flipped = model.forward_head(model.forward_features(batch.flip(1)), pre_logits=True)
        change = ((features - flipped).norm(dim=1) / features.norm(dim=1)).mean()
        print(f"  {name}: |f(clip) - f(reversed clip)| / |f(clip)| = {change:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    out = Path(parser.parse_args().out)
    torch.set_num_threads(1)
    layer_ids()
    train, train_y, train_colour, train_semantic = scenes(2048, seed=998)
    batch, val_y, val_colour, val_semantic = scenes(512)
    found = encoders(out)
    if "EVA" in found:
        clip_view, imagenet_view = (pooled(found["EVA"], normalise(batch, s)) for s in ("clip", "imagenet"))
        cosine = F.cosine_similarity(clip_view, imagenet_view).mean()
        print(f"EVA pooled features, ImageNet vs CLIP normalisation: mean cosine {cosine:.4f}")
    print("frame order at initialisation (32 held-out clips, 8 frames, tubelet 2):")
    frame_order(out)
    majority = 100.0 * (val_semantic == 0).float().mean().item()
    print(
        "encoders (CLIP normalisation): mean pairwise cosine; ridge probe top-1 % (chance 5, 20, 25, "
        f"12.5; per patch: all background {majority:.1f})"
    )
    for name, encoder in found.items():
        features = pooled(encoder, normalise(batch, "clip"))
        unit = F.normalize(features, dim=1)
        similarity = (unit @ unit.T).masked_select(~torch.eye(len(unit), dtype=torch.bool)).mean()
        fit = pooled(encoder, normalise(train, "clip"))
        top1 = ridge_probe(fit, train_y, features, val_y)
        shape = ridge_probe(fit, train_y // 4, features, val_y // 4)  # class = shape x 4 quadrants
        quadrant = ridge_probe(fit, train_y % 4, features, val_y % 4)
        colour = ridge_probe(fit, train_colour, features, val_colour)
        blocks = torch.cat([p.flatten() for n, p in encoder.named_parameters() if n.startswith("blocks.")])
        rms = blocks.pow(2).mean().sqrt()
        kernel = encoder.patch_embed.proj.weight.pow(2).mean().sqrt()
        with torch.no_grad():  # per patch token: the shape under it (segmentation's question), 1024 scenes
            tokens = encoder.forward_features(normalise(train[:1024], "clip"))[:, encoder.num_prefix_tokens :]
            held_out = encoder.forward_features(normalise(batch, "clip"))[:, encoder.num_prefix_tokens :]
        patch = ridge_probe(
            tokens.flatten(0, 1),
            train_semantic[:1024].flatten(),
            held_out.flatten(0, 1),
            val_semantic.flatten(),
        )
        print(
            f"  {name}: {similarity:.3f}; class {top1:.1f} (shape {shape:.1f}, quadrant {quadrant:.1f}), "
            f"colour {colour:.1f}; per-patch shape {patch:.1f}; "
            f"rms of block weights {rms:.4f}, of the patch kernel {kernel:.4f}"
        )


if __name__ == "__main__":
    main()
