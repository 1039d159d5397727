"""Zero-shot action recognition with EVA-CLIP (paper section 4.3: UCF-101, Kinetics-400/600/700).

A video's embedding is the mean of its frames' L2-normalised image embeddings (num_frames TSN
segment centres per view, every view), renormalised; the classifier is the per-class mean of the
normalised text embeddings of the class prompts (`flyeva.tasks.clip.zeroshot.build_classifier`).
`flyeva clip zeroshot` runs it for the video sets of its suite (video_list, kinetics, video_folder).
Frames: short side = the CLIP's image size, centre crop, CLIP mean/std (the tower's own inputs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flyeva.data.transforms import CLIP_MEAN, CLIP_STD
from flyeva.data.video.datasets import VideoList
from flyeva.data.video.decode import get_decoder
from flyeva.data.video.stream import VideoSource, eval_clip_stream
from flyeva.data.video.transforms import ClipEvalTransform

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
