"""Zero-shot action recognition with EVA-CLIP (paper section 4.3: UCF-101, Kinetics-400/600/700).

A video's embedding is the mean of its frames' L2-normalised image embeddings (num_frames TSN
segment centres per view, every view), renormalised; the classifier is the per-class mean of the
normalised text embeddings of the class prompts (`flyeva.tasks.clip.zeroshot.build_classifier`).
Frames: short side = the CLIP's image size, centre crop, CLIP mean/std (the tower's own inputs).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flyeva.data.transforms import CLIP_MEAN, CLIP_STD
from flyeva.tasks.video.datasets import VideoList, load_video_list, write_shapeworld_clips
from flyeva.tasks.video.decode import get_decoder
from flyeva.tasks.video.stream import VideoSource, eval_clip_stream
from flyeva.tasks.video.transforms import ClipEvalTransform

logger = logging.getLogger(__name__)

# In the style of CLIP's Kinetics-700 prompts (Radford et al. 2021, appendix): action names after a verb.
VIDEO_TEMPLATES = (
    "a photo of {}.",
    "a photo of a person {}.",
    "a photo of a person doing {}.",
    "a video of {}.",
    "a video of a person {}.",
    "a video of a person doing {}.",
    "an example of {}.",
    "an example of a person {}.",
    "a demonstration of {}.",
    "a demonstration of a person {}.",
)
# ShapeWorld clip captions read "a red square moving left": prompts name a shape and the motion.
SHAPEWORLD_TEMPLATES = ("a circle {}", "a square {}", "a triangle {}", "a star {}", "a cross {}")


def video_embeddings(model: torch.nn.Module, clips: torch.Tensor) -> torch.Tensor:
    """[B, V, T, 3, S, S] -> [B, D]: the renormalised mean of the frames' normalised embeddings."""
    batch = clips.shape[0]
    frames = model.encode_image(clips.flatten(0, 2), normalize=True).float()
    return F.normalize(frames.view(batch, -1, frames.shape[-1]).mean(dim=1), dim=-1)


@torch.no_grad()
def evaluate_video_zeroshot(
    model: torch.nn.Module,
    videos: VideoList,
    templates: Sequence[str | Callable[[str], str]] = VIDEO_TEMPLATES,
    *,
    image_size: int = 224,
    num_frames: int = 8,
    views: int = 1,
    decoder: str = "auto",
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1/top-5/mean class accuracy (%) of an `EvaClip` on a labelled video list, zero-shot."""
    from flyeva.tasks.clip.zeroshot import build_classifier, topk_correct

    was_training = model.training
    model.eval()
    classifier = build_classifier(model, videos.classes, list(templates), device).float()
    source = VideoSource(videos, get_decoder(decoder), num_frames, image_size, train=False, views=views)
    transform = ClipEvalTransform(image_size, views, 1, CLIP_MEAN, CLIP_STD)
    stream = eval_clip_stream(
        source, transform, batch_size, 0, 1, (views, num_frames, 3, image_size, image_size)
    )
    stream.set_epoch(0)
    correct, seen, skipped = {1: 0, 5: 0}, 0, 0
    per_class = torch.zeros(2, len(videos.classes))
    for batch in stream:
        skipped += batch["num_skipped"]
        if len(batch["clips"]) == 0:
            continue
        labels = batch["labels"].to(device)
        logits = video_embeddings(model, batch["clips"].to(device)) @ classifier
        for k, hits in topk_correct(logits, labels).items():
            correct[k] += hits
        per_class[0].index_add_(0, labels.cpu(), (logits.argmax(-1) == labels).float().cpu())
        per_class[1].index_add_(0, labels.cpu(), torch.ones(len(labels)))
        seen += len(labels)
    model.train(was_training)
    if seen == 0:
        raise ValueError("no readable videos to evaluate; check the list")
    present = per_class[1] > 0
    return {
        "top1": 100.0 * correct[1] / seen,
        "top5": 100.0 * correct[5] / seen,
        "mean_class_top1": 100.0 * float((per_class[0][present] / per_class[1][present]).mean()),
        "videos": seen,
        "skipped_videos": skipped,
        "classes": len(videos.classes),
        "num_frames": num_frames,
        "views": views,
    }


def clip_image_size(cfg: Any) -> int:
    from flyeva.models.eva import get_size

    return cfg.vision.img_size or get_size(cfg.vision.size).img_size


def run_zeroshot_cli(args: argparse.Namespace) -> dict[str, Any]:
    """`flyeva video zeroshot --checkpoint CLIP_FOLDER [--list ...]`: prints and writes a JSON report."""
    from flyeva.tasks.clip.model import load_clip
    from flyeva.tasks.clip.zeroshot import choose_templates, resolve_device

    if args.num_frames < 1 or args.views < 1 or args.batch_size < 1:
        raise ValueError("--num-frames, --views and --batch-size must be at least 1")
    get_decoder(args.decoder)
    model, cfg = load_clip(args.checkpoint)
    device = resolve_device("auto")
    model.to(device)
    image_size = clip_image_size(cfg)
    fallback = list(VIDEO_TEMPLATES)
    if args.list:
        videos = load_video_list(args.type, args.list, args.root, args.classes)
    else:  # ShapeWorld clips, the motion is the class
        folder = Path(args.checkpoint) / "zeroshot_video_data"
        list_file = write_shapeworld_clips(
            folder, 256, seed=1000, image_size=max(32, image_size), num_frames=16
        )
        videos = load_video_list("shapeworld", str(list_file), "", str(folder / "classes.txt"))
        fallback = list(SHAPEWORLD_TEMPLATES)
    templates = choose_templates([], args.templates, fallback)
    report = evaluate_video_zeroshot(
        model, videos, templates, image_size=image_size, num_frames=args.num_frames, views=args.views,
        decoder=args.decoder, batch_size=args.batch_size, device=device,
    )  # fmt: skip
    out = Path(args.out) if args.out else Path(args.checkpoint) / "zeroshot_video.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "checkpoint": args.checkpoint, "list": args.list}, indent=2) + "\n")
    print(
        f"video zero-shot: {report['videos']} videos ({report['skipped_videos']} unreadable), "
        f"{report['classes']} classes: top-1 {report['top1']:.2f} top-5 {report['top5']:.2f} "
        f"mean class {report['mean_class_top1']:.2f}; wrote {out}"
    )
    return report
