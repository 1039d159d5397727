"""Multi-view evaluation of video classification (paper section 4.2; release `EVA-01/video` main.py
`validate`): the softmax of every view x crop clip of a video is averaged and the average is ranked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from flyeva.engine import distributed as D
from flyeva.engine.loop import StepContext
from flyeva.eval.classification import CONFUSION_MAX_CLASSES, Evaluator


def average_views(logits: torch.Tensor) -> torch.Tensor:
    """[B, views, K] logits -> [B, K]: the mean of the per-view softmax (not of the logits)."""
    return logits.float().softmax(dim=-1).mean(dim=1)


class VideoEvaluator(Evaluator):
    """Multi-view top-1/top-5/mean-class accuracy (percent) over all ranks; batches [B, V, T, C, H, W]."""

    def __init__(
        self, stream: Any, num_classes: int, precision: str = "fp32", max_batches: int = 0, classes=None
    ):
        super().__init__(stream, num_classes, precision, max_batches, classes)
        self.last: dict[str, Any] = {}

    def details(self) -> dict[str, Any]:
        return {**self.last, **super().details()}

    @torch.no_grad()
    def __call__(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        device, classes = ctx.device, self.num_classes
        counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1, top-5, nll sum, videos
        per_class = torch.zeros(2, classes, dtype=torch.float64, device=device)  # hits, videos
        confusion = torch.zeros(classes, classes, dtype=torch.float64, device=device)
        forwards, sample, skipped = 0, None, 0
        for batch in self._batches():
            skipped += batch["num_skipped"]
            clips, labels = batch["clips"].to(device), batch["labels"].to(device)
            if len(clips) == 0:
                continue
            views = clips.flatten(0, 1)
            logits = self._forward(model, views, device).view(len(clips), clips.shape[1], -1)
            forwards, sample = forwards + 1, views[:1]
            probs = average_views(logits)
            top = probs.topk(min(5, classes), dim=-1).indices
            hits = top == labels[:, None]
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(-1).sum()
            counts[2] -= probs.gather(1, labels[:, None]).clamp_min(1e-12).log().sum()
            counts[3] += len(labels)
            per_class[0].index_add_(0, labels, hits[:, 0].double())
            per_class[1].index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            confusion.index_put_(
                (labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True
            )
        self._match_forward_count(model, forwards, sample, device)
        top1, top5, nll, videos = D.all_reduce_sum(counts).tolist()
        per_class = D.all_reduce_sum(per_class)
        if videos == 0:
            raise ValueError("the validation set yielded no readable videos; check data.val")
        seen = per_class[1] > 0
        mean_class = float((per_class[0][seen] / per_class[1][seen]).mean()) * 100
        if classes <= CONFUSION_MAX_CLASSES:
            self.confusion = D.all_reduce_sum(confusion).cpu()
        skipped = int(D.all_reduce_sum(torch.tensor([float(skipped)], device=device)).item())
        self.last = {"videos": int(videos), "skipped_videos": skipped}
        accuracy = {"top1": 100 * top1 / videos, "top5": 100 * top5 / videos}
        return {**accuracy, "mean_class_top1": mean_class, "loss": nll / videos}
