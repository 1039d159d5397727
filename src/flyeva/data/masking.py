"""Block-wise mask generator for MIM pretraining: BEiT's, as used by EVA (docs/recipes.md §3).

The algorithm is the release's `masking_generator.py`, line for line, except that the caller passes
a `numpy.random.Generator` (no global state), a block is filled by one slice assignment, and the
result is a bool array. `random.uniform(a, b)` is `a + (b - a) * u` and `random.randint(0, n)` is
`int(u * (n + 1))`, with `u` a uniform float: the same laws as Python's `random`.

Minimum block size. The paper speaks of blocks of at least 16 patches, but the release only draws
the *target* area from U(16, budget) and rounds the sides, so a placed rectangle can be smaller
(area 16 with aspect 0.39 gives 2 x 6 = 12 cells), and once the remaining budget is under 16 the
area is drawn from U(budget, 16). The default keeps this (the masks EVA was trained with).
`strict_min_area=True` is a documented deviation: it rejects a rectangle smaller than
min(min_num_patches, remaining budget); the mean masked fraction drops by 0.08% (docs/performance.md,
"Masking speed", which also gives the speed), but with a budget below min_num_patches (e.g. 8x8,
budget 5, min 16) it rejects most rounded-down rectangles and masks ~7x less.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch


class MaskBlock(NamedTuple):
    """One rectangle placed by the generator, in grid cells."""

    top: int
    left: int
    height: int
    width: int
    newly_masked: int  # cells this block turned on; it may overlap earlier blocks
    budget: int  # most cells it was allowed to turn on


def _uniform_stream(rng: np.random.Generator, chunk: int = 64) -> Iterator[float]:
    # Drawing floats in chunks is ~10x faster than one Generator call per number.
    while True:
        yield from rng.random(chunk).tolist()


@dataclass(frozen=True)
class BlockMaskGenerator:
    """BEiT/EVA block-wise masking on a (height, width) patch grid.

    Masks are drawn block by block until `num_masking_patches` cells are masked or a round of
    `attempts` tries adds nothing, so a mask never has more than `num_masking_patches` cells.
    Defaults are EVA's (docs/recipes.md §3): 16x16 grid, 105 masked (~40%), blocks from 16
    patches, aspect ratio log-uniform in [0.3, 1/0.3], 10 attempts per block.
    """

    grid: tuple[int, int] = (16, 16)
    num_masking_patches: int = 105
    min_num_patches: int = 16
    max_num_patches: int | None = None  # None: the whole budget, as in the release
    min_aspect: float = 0.3
    max_aspect: float | None = None  # None: 1 / min_aspect, as in the release
    attempts: int = 10
    strict_min_area: bool = False  # True: reject rectangles under the sampled minimum (see module doc)
    # Resolved at construction (None -> the release's default); fields keep what was given.
    _max_block_patches: int = field(init=False, repr=False, compare=False)
    _log_aspect_range: tuple[float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        grid = tuple(int(side) for side in self.grid)
        if len(grid) != 2 or min(grid) < 2:
            raise ValueError(
                f"grid={self.grid!r} must be (height, width) with both sides >= 2 patches, "
                "since a block must be strictly smaller than the grid on each side"
            )
        num_patches = grid[0] * grid[1]
        if not 1 <= self.num_masking_patches <= num_patches:
            raise ValueError(
                f"num_masking_patches={self.num_masking_patches} must be between 1 and the "
                f"{num_patches} patches of grid {grid}; lower it (or the mask_ratio)"
            )
        largest_block = (grid[0] - 1) * (grid[1] - 1)
        if not 1 <= self.min_num_patches <= largest_block:
            raise ValueError(
                f"min_num_patches={self.min_num_patches} must be between 1 and {largest_block}: "
                f"blocks are strictly smaller than grid {grid} on each side; lower min_num_patches"
            )
        max_num_patches = self.num_masking_patches if self.max_num_patches is None else self.max_num_patches
        if max_num_patches < 1:
            raise ValueError(f"max_num_patches={self.max_num_patches} must be >= 1 (or None for the budget)")
        if not self.min_aspect > 0:
            raise ValueError(f"min_aspect={self.min_aspect} must be > 0 (EVA uses 0.3)")
        max_aspect = 1 / self.min_aspect if self.max_aspect is None else self.max_aspect
        if max_aspect < self.min_aspect:
            raise ValueError(f"max_aspect={max_aspect} must be >= min_aspect={self.min_aspect}")
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts} must be >= 1 (EVA uses 10)")
        object.__setattr__(self, "grid", grid)
        object.__setattr__(self, "_max_block_patches", max_num_patches)
        object.__setattr__(self, "_log_aspect_range", (math.log(self.min_aspect), math.log(max_aspect)))

    @classmethod
    def from_ratio(cls, grid: tuple[int, int], mask_ratio: float, **kwargs) -> BlockMaskGenerator:
        """Budget = round(mask_ratio * patches); EVA's 105 of 256 is mask_ratio=105/256 (0.4 gives 102)."""
        if not 0 < mask_ratio <= 1:
            raise ValueError(f"mask_ratio={mask_ratio} must be in (0, 1]")
        return cls(grid=grid, num_masking_patches=round(mask_ratio * grid[0] * grid[1]), **kwargs)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask: bool array of shape `grid`, True = masked."""
        return self._sample(rng, blocks=None)

    def sample_blocks(self, rng: np.random.Generator) -> tuple[np.ndarray, list[MaskBlock]]:
        """One mask and the rectangles placed to make it, in order (same draws as `__call__`)."""
        blocks: list[MaskBlock] = []
        return self._sample(rng, blocks), blocks

    def _sample(self, rng: np.random.Generator, blocks: list[MaskBlock] | None) -> np.ndarray:
        mask = np.zeros(self.grid, dtype=bool)
        uniform = _uniform_stream(rng)
        masked = 0
        while masked < self.num_masking_patches:
            budget = min(self.num_masking_patches - masked, self._max_block_patches)
            added = self._place_block(mask, budget, uniform, blocks)
            if added == 0:  # a whole round of attempts failed: stop, as the release does
                break
            masked += added
        return mask

    def _place_block(
        self, mask: np.ndarray, budget: int, uniform: Iterator[float], blocks: list[MaskBlock] | None
    ) -> int:
        grid_height, grid_width = self.grid
        low_area = self.min_num_patches
        log_low, log_high = self._log_aspect_range
        area_floor = min(low_area, budget)
        for _ in range(self.attempts):
            # U(min_num_patches, budget); when budget < min this is U(budget, min), as in the release.
            target_area = low_area + (budget - low_area) * next(uniform)
            aspect = math.exp(log_low + (log_high - log_low) * next(uniform))
            height = round(math.sqrt(target_area * aspect))
            width = round(math.sqrt(target_area / aspect))
            if height >= grid_height or width >= grid_width:
                continue
            if self.strict_min_area and height * width < area_floor:
                continue
            top = int(next(uniform) * (grid_height - height + 1))
            left = int(next(uniform) * (grid_width - width + 1))
            window = mask[top : top + height, left : left + width]
            added = height * width - int(np.count_nonzero(window))
            if 0 < added <= budget:
                window[...] = True
                if blocks is not None:
                    blocks.append(MaskBlock(top, left, height, width, added, budget))
                return added
        return 0


def generate_masks(
    generator: BlockMaskGenerator, batch_size: int, rng: np.random.Generator | int
) -> torch.Tensor:
    """`batch_size` masks as a bool tensor [batch_size, height * width] (row-major tokens); `rng` is a
    Generator (consumed) or an int seed."""
    if isinstance(rng, int):
        rng = np.random.default_rng(rng)
    masks = np.stack([generator(rng) for _ in range(batch_size)])
    return torch.from_numpy(masks.reshape(batch_size, -1))


def fixed_validation_mask(grid: tuple[int, int]) -> torch.Tensor:
    """The validation mask "every other token" (docs/recipes.md §3): bool [height * width], the even
    row-major indices 0, 2, 4, ... masked."""
    height, width = grid
    return torch.arange(height * width) % 2 == 0
