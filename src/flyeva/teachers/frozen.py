"""What every MIM teacher shares: frozen weights, eval mode, targets in the teacher's own precision.

The release runs its CLIP teacher under autocast (docs/recipes.md §3), so its targets are computed
in reduced precision. flyeva casts the frozen teacher once instead (`teacher.precision`): no
per-step weight casts, and a CPU that trains in fp32 still runs the teacher on its bf16 units
(4x faster for CLIP-B/16 on AMX, docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TEACHER_PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware (CUDA sm80+, CPUs with AMX or AVX512-BF16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_teacher_dtype(precision: str, train_precision: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype for `teacher.precision`: auto | fp32 | bf16 | fp16.

    auto = the training precision when it is bf16 or fp16 (the release's autocast teacher), else
    bf16 where the device computes it natively, else fp32.
    """
    if precision == "auto":
        if train_precision in ("bf16", "fp16"):
            return TEACHER_PRECISIONS[train_precision]
        return torch.bfloat16 if has_native_bf16(device) else torch.float32
    if precision not in TEACHER_PRECISIONS:
        choices = ", ".join(["auto", *TEACHER_PRECISIONS])
        raise ValueError(f"teacher.precision must be one of {choices}, got {precision!r}")
    return TEACHER_PRECISIONS[precision]


def precision_name(dtype: torch.dtype) -> str:
    """fp32 / bf16 / fp16 for a teacher dtype (for logs and resolved configs)."""
    return next(name for name, value in TEACHER_PRECISIONS.items() if value == dtype)


class FrozenTeacher(nn.Module):
    """Base of the MIM teachers: `forward(images)` -> fp32 targets [B, num_patches, embed_dim].

    Subclasses build their tower, set `name`, `image_size`, `patch_size`, `grid_size`, `embed_dim`,
    `num_patches`, call `freeze()`, and implement `patch_targets`. `teacher.to(torch.bfloat16)`
    makes every later forward run in bf16, whatever autocast the caller has open.
    """

    name: str
    image_size: int

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        # The teacher is frozen: an engine calling model.train() must not switch it out of eval mode.
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def patch_targets(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"teacher '{self.name}' expects images [B, {', '.join(map(str, expected))}], got "
                f"{list(images.shape)}; feed it the student's crop at {self.image_size} px "
                "(docs/recipes.md §3)"
            )
        with torch.inference_mode(), torch.autocast(images.device.type, enabled=False):
            targets = self.patch_targets(images.to(self.dtype))
        # A copy made outside inference mode is an ordinary tensor: usable as a loss target.
        return targets.to(torch.float32, copy=True)
