"""The classification objective (Mixup/CutMix, label smoothing), top-1/top-5 evaluation; image
classification and video recognition both use them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flyeva.data.stream import mix_seed
from flyeva.data.transforms import seeded_host_rngs
from flyeva.engine import distributed as D
from flyeva.engine.loop import PRECISIONS, StepContext

CONFUSION_MAX_CLASSES = 50  # a confusion summary is readable (and cheap) up to this many classes


class ClassificationObjective:
    """Cross-entropy on logits; with Mixup/CutMix (`mixup`: timm `Mixup` keyword arguments), soft-target
    cross-entropy. Mixing is seeded by (seed, rank, step, micro-step): a resumed run mixes the same way."""

    def __init__(self, num_classes: int, smoothing: float = 0.0, mixup: dict[str, Any] | None = None):
        from timm.data import Mixup
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        self.num_classes = num_classes
        active = mixup is not None and (mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0)
        self.mixup = Mixup(**mixup, label_smoothing=smoothing, num_classes=num_classes) if active else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()  # targets are mixed and smoothed already
        elif smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    handles_backward = False
    input_key = "images"  # the batch entry the model reads (videos: "clips")

    def nothing(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        """A zero loss through the model's forward (every DDP rank joins the gradient all-reduce)."""
        return model(inputs).sum() * 0.0

    def mix(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup/CutMix on [B, C, H, W]; subclasses reshape other inputs around it."""
        return self.mixup(inputs, labels)

    def __call__(
        self, model: nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict]:
        inputs, labels = batch[self.input_key], batch["labels"]
        if self.mixup is not None and len(inputs) % 2:
            inputs, labels = inputs[:-1], labels[:-1]  # timm mixes each sample with its mirror in the batch
        targets: torch.Tensor = labels
        if self.mixup is not None and len(inputs):
            with seeded_host_rngs(mix_seed(ctx.seed, ctx.rank, ctx.step, ctx.micro)):
                inputs, targets = self.mix(inputs, labels)
        if len(inputs) == 0:  # every sample of the batch was unreadable: contribute nothing
            return self.nothing(model, inputs), {}
        logits = model(inputs)
        loss = self.criterion(logits.float(), targets)
        metrics = {}
        if self.mixup is None:
            metrics["train_top1"] = (logits.argmax(-1) == labels).float().mean().item() * 100
        return loss, metrics


class Evaluator:
    """Top-1/top-5 (percent) and mean cross-entropy on a labelled stream, each rank on its share; up to
    50 classes also the confusion matrix of the trained model (`confusion`) and its EMA (`ema_confusion`)."""

    def __init__(
        self,
        stream: Any,
        num_classes: int,
        precision: str = "fp32",
        max_batches: int = 0,
        classes: list[str] | None = None,
    ):
        self.stream, self.num_classes, self.classes = stream, num_classes, classes
        self.autocast_dtype = PRECISIONS[precision]
        self.max_batches = max_batches
        self.confusion: torch.Tensor | None = None
        self.ema_confusion: torch.Tensor | None = None
        self._trained_model: nn.Module | None = None

    def details(self) -> dict[str, Any]:
        """Per-class top-1 and the most-confused pairs of the last evaluation (and of the EMA model)."""
        found = {"confusion": self.confusion, "ema_confusion": self.ema_confusion}
        return {k: confusion_summary(v, self.classes) for k, v in found.items() if v is not None}

    def _batches(self) -> Iterator[dict[str, Any]]:
        self.stream.set_epoch(0)
        for index, batch in enumerate(self.stream):
            if self.max_batches and index >= self.max_batches:
                return
            yield batch

    @torch.no_grad()
    def __call__(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        device = ctx.device
        counts = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss, images
        tracked = self.num_classes <= CONFUSION_MAX_CLASSES
        confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=device)
        forwards, last_images = 0, None
        for batch in self._batches():
            images, labels = batch["images"].to(device), batch["labels"].to(device)
            if len(images) == 0:
                continue
            logits = self._forward(model, images, device).float()
            forwards, last_images = forwards + 1, images[:1]
            top = logits.topk(min(5, self.num_classes), dim=-1).indices
            hits = top == labels[:, None]
            counts[0] += hits[:, 0].sum()
            counts[1] += hits.any(-1).sum()
            counts[2] += F.cross_entropy(logits, labels, reduction="sum")
            counts[3] += len(labels)
            if tracked:
                confusion.index_put_(
                    (labels, top[:, 0]), torch.ones_like(labels, dtype=torch.float64), accumulate=True
                )
        self._match_forward_count(model, forwards, last_images, device)
        top1, top5, loss_sum, images_seen = D.all_reduce_sum(counts).tolist()
        if images_seen == 0:
            raise ValueError("the validation set yielded no readable images; check data.val")
        if tracked:
            confusion = D.all_reduce_sum(confusion).cpu()
            if self._trained_model is None:
                self._trained_model = model  # the engine evaluates the trained model first, then its EMA
            if model is self._trained_model:
                self.confusion = confusion
            else:
                self.ema_confusion = confusion
        return {
            "top1": 100 * top1 / images_seen,
            "top5": 100 * top5 / images_seen,
            "loss": loss_sum / images_seen,
        }

    def _forward(self, model: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        enabled = self.autocast_dtype is not None
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=enabled):
            return model(images)

    def _match_forward_count(
        self, model: nn.Module, forwards: int, sample: Any, device: torch.device
    ) -> None:
        """Sharded models (FSDP) gather weights in every forward: all ranks must run as many."""
        if D.world_size() == 1:
            return
        most = max(D.all_gather_objects(forwards))
        if forwards < most and sample is None:
            raise ValueError("a rank got no validation images; use fewer ranks or a larger validation set")
        for _ in range(most - forwards):
            self._forward(model, sample, device)


def confusion_summary(
    confusion: torch.Tensor, classes: list[str] | None, top_pairs: int = 10
) -> dict[str, Any]:
    """Per-class accuracy (percent) and the most-confused (true, predicted) pairs of a confusion matrix."""
    names = classes or [str(i) for i in range(len(confusion))]
    per_class_total = confusion.sum(1)
    accuracy = {
        names[i]: (100 * confusion[i, i] / per_class_total[i]).item() if per_class_total[i] > 0 else None
        for i in range(len(names))
    }
    off_diagonal = confusion.clone()
    off_diagonal.fill_diagonal_(0)
    pairs = []
    values, flat = off_diagonal.flatten().sort(descending=True, stable=True)  # ties: class order
    for value, index in zip(values.tolist()[:top_pairs], flat.tolist()[:top_pairs]):
        if value <= 0:
            break
        true, predicted = divmod(index, len(names))
        pairs.append({"true": names[true], "predicted": names[predicted], "count": int(value)})
    return {"per_class_top1": accuracy, "most_confused": pairs}
