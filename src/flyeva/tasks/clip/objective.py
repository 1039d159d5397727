"""The contrastive objective over the global batch (open_clip's `ClipLoss(local_loss=True,
gather_with_grad=True)`, docs/recipes.md section 5), with exact micro-batch accumulation.

Accumulation (open_clip's train.py) caches every micro-batch's features in a no-grad pass, then per
micro-batch recomputes its slot with grad and backpropagates the whole batch's loss. Unlike open_clip,
each grad pass replays its cached pass's RNG state (the same drop paths, so the cached features are
the ones differentiated) and logit_scale takes its gradient from one pass only. Ranks that lost
unreadable pairs are padded to the largest rank's batch and the padding is masked out of the loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import nn

from flyeva.engine import distributed as D


class GatheredClipLoss(ClipLoss):
    """open_clip's ClipLoss over all ranks' features; `valid_counts[r]` = real (first) rows of rank r."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size
        )

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        valid_counts: Sequence[int] | None = None,
    ) -> torch.Tensor:
        rows = image_features.shape[0]
        if valid_counts is None or all(count == rows for count in valid_counts):
            return super().forward(image_features, text_features, logit_scale)
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale)
        device = image_features.device
        # Column j of the gathered logits is row j % rows of rank j // rows.
        valid = torch.cat([torch.arange(rows, device=device) < count for count in valid_counts])
        own = valid[self.rank * rows : (self.rank + 1) * rows]
        labels = torch.arange(rows, device=device) + rows * self.rank
        total = 0.0
        for logits in (logits_per_image, logits_per_text):
            logits = logits.masked_fill(~valid, float("-inf"))[own]
            total = total + F.cross_entropy(logits, labels[own], reduction="sum")
        # Mean over ranks of (sum over own valid rows x world / all valid rows) = the global mean.
        return total / 2 * self.world_size / max(1, sum(valid_counts))  # 0 when no rank has a pair


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class ClipObjective:
    """Engine objective for batches of "images" and "texts"; it calls `ctx.backward` itself, once per
    micro-batch of `micro_batch_size` rows (0 = the whole per-rank batch), all-reducing on the last."""

    handles_backward = True
    input_key = "images"

    def __init__(self, tokenize: Callable[[list[str]], torch.Tensor], micro_batch_size: int = 0):
        if micro_batch_size < 0:
            raise ValueError(f"micro_batch_size must be >= 0 (0 = no accumulation), got {micro_batch_size}")
        self.tokenize, self.micro_batch_size = tokenize, micro_batch_size
        self._loss: GatheredClipLoss | None = None

    @property
    def loss(self) -> GatheredClipLoss:
        if self._loss is None:  # rank and world size exist only once the engine joined the group
            self._loss = GatheredClipLoss(D.rank(), D.world_size())
        return self._loss

    def _valid_counts(self, rows: int, device: torch.device) -> list[int]:
        if D.world_size() == 1:
            return [rows]
        counts = torch.zeros(D.world_size(), dtype=torch.long, device=device)
        counts[D.rank()] = rows
        return [int(c) for c in D.all_reduce_sum(counts).tolist()]

    def __call__(self, model: nn.Module, batch: dict[str, Any], ctx: Any) -> tuple[torch.Tensor, dict]:
        images, texts = batch["images"], list(batch["texts"])
        if len(texts) != len(images):
            raise ValueError(f"batch has {len(images)} images but {len(texts)} texts; they must pair up")
        # Clamped before this step's forwards: what open_clip does after each optimizer step.
        D.unwrap(model).clamp_logit_scale()
        device = images.device
        tokens = self.tokenize(texts).to(device) if texts else None
        counts = self._valid_counts(len(texts), device)
        rows = max(1, max(counts))
        if len(texts) < rows:
            image_size = D.unwrap(model).visual.patch_embed.img_size
            images, tokens = _pad_batch(images, tokens, rows, image_size, self.tokenize)
        micro = self.micro_batch_size or rows
        chunks = [slice(start, min(start + micro, rows)) for start in range(0, rows, micro)]
        if len(chunks) == 1:
            image_features, text_features, logit_scale = model(images, tokens)
            loss = self.loss(image_features, text_features, logit_scale, counts)
            ctx.backward(loss)
        else:
            loss, logit_scale = self._accumulate(model, images, tokens, chunks, counts, ctx)
        metrics = {"logit_scale": float(logit_scale.detach()), "pairs": float(sum(counts))}
        return loss.detach(), metrics

    def _accumulate(
        self,
        model: nn.Module,
        images: torch.Tensor,
        tokens: torch.Tensor,
        chunks: list[slice],
        counts: list[int],
        ctx: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = images.device
        states, cached_images, cached_texts = [], [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(_rng_state(device))
                image_features, text_features, _ = model(images[chunk], tokens[chunk])
                cached_images.append(image_features)
                cached_texts.append(text_features)
        after_cache = _rng_state(device)
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            with D.grad_sync_context(model, last):
                _set_rng_state(states[index], device)  # same drop-path draws as the cached pass
                image_features, text_features, logit_scale = model(images[chunk], tokens[chunk])
                all_images = torch.cat([*cached_images[:index], image_features, *cached_images[index + 1 :]])
                all_texts = torch.cat([*cached_texts[:index], text_features, *cached_texts[index + 1 :]])
                # logit_scale's gradient once per step: the loss is the same in every pass.
                scale = logit_scale if last else logit_scale.detach()
                loss = self.loss(all_images, all_texts, scale, counts)
                ctx.backward(loss)
        _set_rng_state(after_cache, device)
        return loss, logit_scale


def _pad_batch(
    images: torch.Tensor,
    tokens: torch.Tensor | None,
    rows: int,
    image_size: tuple[int, int],
    tokenize: Callable[[list[str]], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat the pairs (or one blank pair) up to `rows`; the loss masks the copies out."""
    have = 0 if tokens is None else tokens.shape[0]
    if have == 0:  # every pair of this rank's batch was unreadable
        images = torch.zeros(1, 3, *image_size, device=images.device)
        tokens = tokenize([""]).to(images.device)
        have = 1
    repeat = math.ceil(rows / have)
    return images.repeat(repeat, 1, 1, 1)[:rows], tokens.repeat(repeat, 1)[:rows]
