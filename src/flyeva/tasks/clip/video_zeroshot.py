"""Zero-shot action recognition with EVA-CLIP (paper section 4.3: UCF-101, Kinetics-400/600/700).

A video's embedding is the renormalised mean of its frames' L2-normalised image embeddings (TSN
segment centres of every view); frames get the tower's own inputs (docs/video.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from flyeva.data.transforms import CLIP_MEAN, CLIP_STD
from flyeva.data.video.datasets import VideoList
from flyeva.data.video.decode import get_decoder
from flyeva.data.video.stream import VideoSource, eval_clip_stream
from flyeva.data.video.transforms import ClipEvalTransform
from flyeva.tasks.clip.zeroshot import build_classifier, topk_correct

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
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1/top-5/mean class accuracy (%) of an `EvaClip` on a labelled video list, zero-shot."""
    was_training = model.training
    model.eval()
    classifier = build_classifier(model, videos.classes, list(templates), device).float()
    source = VideoSource(videos, get_decoder("auto"), num_frames, image_size, train=False, views=views)
    transform = ClipEvalTransform(image_size, views, 1, CLIP_MEAN, CLIP_STD)
    stream = eval_clip_stream(
        source, transform, batch_size, 0, 1, (views, num_frames, 3, image_size, image_size)
    )
    stream.set_epoch(0)
    correct, seen, skipped = Counter(), 0, 0
    per_class = torch.zeros(2, len(videos.classes))
    for batch in stream:
        skipped += batch["num_skipped"]
        if len(batch["clips"]) == 0:
            continue
        labels = batch["labels"].to(device)
        logits = video_embeddings(model, batch["clips"].to(device)) @ classifier
        correct.update(topk_correct(logits, labels))
        per_class[0].index_add_(0, labels.cpu(), (logits.argmax(-1) == labels).float().cpu())
        per_class[1].index_add_(0, labels.cpu(), torch.ones(len(labels)))
        seen += len(labels)
    model.train(was_training)
    if seen == 0:
        raise ValueError("no readable videos to evaluate; check the list")
    present = per_class[1] > 0
    accuracy = {f"top{k}": 100.0 * hits / seen for k, hits in correct.items()}
    mean_class = 100.0 * float((per_class[0][present] / per_class[1][present]).mean())
    counts = {"videos": seen, "skipped_videos": skipped, "classes": len(videos.classes)}
    return {**accuracy, "mean_class_top1": mean_class, **counts, "num_frames": num_frames, "views": views}
