"""EVA's MIM objective: regress frozen CLIP patch features at masked positions (docs/recipes.md §3).

Without a mask generator it is feature distillation, the baseline of the paper's Table 2: the student
sees the whole image and regresses the teacher's features at every patch, with the same loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flyeva.data.masking import BlockMaskGenerator, fixed_validation_mask, generate_masks


def mim_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity over masked tokens, in fp32 (the release's sign: lower is better)."""
    return -F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()


def pixel_targets(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Per-patch normalised pixels [B, N, p*p*3] (MAE's target; the paper's pixel baseline)."""
    patches = F.unfold(images, kernel_size=patch_size, stride=patch_size).transpose(1, 2)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
    return (patches - mean) / (var + 1e-6).sqrt()


class MIMObjective(nn.Module):
    """Masks a batch, runs the student, and scores it against the teacher on the same unmasked crop."""

    handles_backward = False
    input_key = "images"

    def __init__(self, teacher: nn.Module | None, mask_generator: BlockMaskGenerator | None, patch_size: int):
        super().__init__()
        self.teacher = teacher  # None = normalised-pixel targets
        self.mask_generator = mask_generator  # None = no masking: feature distillation
        self.patch_size = patch_size

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        if self.teacher is None:
            return pixel_targets(images, self.patch_size)
        return self.teacher(images)

    def forward(self, model: nn.Module, batch: dict[str, Any], ctx: Any) -> tuple[torch.Tensor, dict]:
        images = batch["images"]
        if self.mask_generator is None:
            return self._distillation_loss(model, images), {"masked_fraction": 0.0}
        # Masks depend only on (seed, epoch, step, micro-step, rank): resume reproduces them exactly.
        rng = np.random.default_rng([ctx.seed, ctx.epoch, ctx.step, ctx.micro, ctx.rank])
        mask = generate_masks(self.mask_generator, images.shape[0], rng)
        # Counted on the host copy: `.item()` on a device tensor would stall the GPU every step.
        masked_fraction = mask.float().mean().item()
        mask = mask.to(images.device, non_blocking=True)
        return mim_loss(model(images, mask), self.targets(images)[mask]), {"masked_fraction": masked_fraction}

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Loss with the release's fixed validation mask (every other token); none for distillation."""
        if self.mask_generator is None:
            return self._distillation_loss(model, images)
        mask = fixed_validation_mask(self.mask_generator.grid).to(images.device).expand(images.shape[0], -1)
        return mim_loss(model(images, mask), self.targets(images)[mask])

    def _distillation_loss(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return mim_loss(model(images, None), self.targets(images).flatten(0, 1))
