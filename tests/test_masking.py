"""Block-wise mask generator (docs/recipes.md §3) against a straight port of the release."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from flyeva.data.masking import BlockMaskGenerator, fixed_validation_mask, generate_masks


class ReleaseMaskingGenerator:
    """The release's `masking_generator.py` (BEiT) as published, with `np.int` replaced by `int`.

    `random_source` defaults to the module `random` of the release; any object with
    `uniform(a, b)` and `randint(a, b)` can replace it.
    """

    def __init__(
        self,
        input_size,
        num_masking_patches,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
        random_source=random,
    ):
        self.height, self.width = input_size
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.random = random_source

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.random.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.random.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))  # noqa: RUF046 (verbatim)
            w = int(round(math.sqrt(target_area / aspect_ratio)))  # noqa: RUF046 (verbatim)
            if w < self.width and h < self.height:
                top = self.random.randint(0, self.height - h)
                left = self.random.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            else:
                mask_count += delta
        return mask


class NumpyDrawsAsRandom:
    """`random`-like source that reads the same uniform floats, in order, as BlockMaskGenerator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def uniform(self, a, b):
        return a + (b - a) * self.rng.random()  # Python's random.uniform formula

    def randint(self, a, b):
        return a + int(self.rng.random() * (b - a + 1))


# (grid, budget, min_num_patches): EVA's, a 14x14 grid, small grids (one with budget < min), non-square.
CONFIGS = [
    ((16, 16), 105, 16),
    ((14, 14), 78, 16),
    ((8, 8), 25, 4),
    ((8, 8), 5, 16),
    ((12, 20), 96, 16),
]
# Budget 5 < min 16 is left out of the mean test: most of its masks are empty (10 failed attempts)
# and its mean has ~3% relative noise at 2000 draws; the exact-draw test covers it.
TYPICAL_CONFIGS = [config for config in CONFIGS if config[1] >= config[2]]


@pytest.mark.parametrize(("grid", "budget", "min_patches"), CONFIGS)
def test_identical_to_release_port_given_the_same_uniform_draws(grid, budget, min_patches):
    generator = BlockMaskGenerator(grid, budget, min_num_patches=min_patches)
    port = ReleaseMaskingGenerator(grid, budget, min_num_patches=min_patches)
    for seed in range(300):
        port.random = NumpyDrawsAsRandom(np.random.default_rng(seed))
        expected = port().astype(bool)
        np.testing.assert_array_equal(
            generator(np.random.default_rng(seed)), expected, err_msg=f"seed {seed}"
        )


@pytest.mark.parametrize(("grid", "budget", "min_patches"), TYPICAL_CONFIGS)
@pytest.mark.parametrize("strict_min_area", [False, True])
def test_mean_masked_fraction_within_one_percent_of_release(grid, budget, min_patches, strict_min_area):
    draws = 2000
    port = ReleaseMaskingGenerator(grid, budget, min_num_patches=min_patches, random_source=random.Random(0))
    port_mean = np.mean([port().mean() for _ in range(draws)])
    generator = BlockMaskGenerator(grid, budget, min_num_patches=min_patches, strict_min_area=strict_min_area)
    rng = np.random.default_rng(0)
    ours_mean = np.mean([generator(rng).mean() for _ in range(draws)])
    assert abs(ours_mean / port_mean - 1) < 0.01, (ours_mean, port_mean)
    # Masks come close to the budget: the mean is within 10% of it (0.408 of 0.410 for EVA's grid).
    assert ours_mean > 0.9 * budget / (grid[0] * grid[1])


@pytest.mark.parametrize(("grid", "budget", "min_patches"), CONFIGS)
def test_never_more_than_the_budget_and_blocks_account_for_the_mask(grid, budget, min_patches):
    generator = BlockMaskGenerator(grid, budget, min_num_patches=min_patches)
    rng = np.random.default_rng(1)
    counts = []
    for _ in range(1000):
        mask, blocks = generator.sample_blocks(rng)
        count = int(mask.sum())
        counts.append(count)
        assert count <= budget
        assert sum(block.newly_masked for block in blocks) == count
        union = np.zeros(grid, dtype=bool)
        for block in blocks:
            union[block.top : block.top + block.height, block.left : block.left + block.width] = True
        np.testing.assert_array_equal(union, mask)
    assert max(counts) == budget  # the budget is reached exactly, not just approached


def test_release_rounding_places_blocks_below_the_minimum():
    # What really holds in the release (default): the target area is >= 16 while the budget is,
    # but rounded sides can give a smaller rectangle, never below 12 cells (2 x 6 at area 16).
    generator = BlockMaskGenerator()
    rng = np.random.default_rng(2)
    areas = [
        block.height * block.width
        for _ in range(2000)
        for block in generator.sample_blocks(rng)[1]
        if block.budget >= 16
    ]
    assert min(areas) >= 12
    assert sum(area < 16 for area in areas) > 0


@pytest.mark.parametrize(("grid", "budget", "min_patches"), CONFIGS)
def test_strict_min_area_blocks_respect_the_minimum(grid, budget, min_patches):
    generator = BlockMaskGenerator(grid, budget, min_num_patches=min_patches, strict_min_area=True)
    rng = np.random.default_rng(3)
    for _ in range(1000):
        for block in generator.sample_blocks(rng)[1]:
            assert block.height * block.width >= min(min_patches, block.budget)
            assert block.height < grid[0] and block.width < grid[1]
            assert 0 < block.newly_masked <= block.budget


def test_aspect_ratio_and_sides_follow_the_config():
    generator = BlockMaskGenerator(grid=(16, 16), num_masking_patches=105, min_aspect=1.0, max_aspect=1.0)
    _, blocks = generator.sample_blocks(np.random.default_rng(4))
    assert all(block.height == block.width for block in blocks)  # aspect 1 -> square blocks only
    assert len(blocks) >= 2


def test_same_seed_same_masks_different_seed_different_masks():
    generator = BlockMaskGenerator()
    first = [generator(np.random.default_rng(7)) for _ in range(2)]
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(20):
        np.testing.assert_array_equal(generator(rng_a), generator(rng_b))
    np.testing.assert_array_equal(first[0], first[1])
    others = [generator(np.random.default_rng(seed)) for seed in range(8, 18)]
    assert all(not np.array_equal(first[0], other) for other in others)
    # Successive masks from one Generator differ too.
    rng = np.random.default_rng(7)
    assert not np.array_equal(generator(rng), generator(rng))


def test_dtype_and_shape():
    mask = BlockMaskGenerator(grid=(12, 20), num_masking_patches=96)(np.random.default_rng(0))
    assert mask.dtype == np.bool_
    assert mask.shape == (12, 20)


def test_generate_masks_is_row_major_and_seeded():
    generator = BlockMaskGenerator(grid=(12, 20), num_masking_patches=96)
    batch = generate_masks(generator, 4, rng=5)
    assert batch.dtype == torch.bool
    assert batch.shape == (4, 240)
    rng = np.random.default_rng(5)
    for row in batch:
        np.testing.assert_array_equal(row.numpy(), generator(rng).reshape(-1))
    assert torch.equal(batch, generate_masks(generator, 4, rng=np.random.default_rng(5)))
    assert not torch.equal(batch, generate_masks(generator, 4, rng=6))


def test_fixed_validation_mask_values():
    assert fixed_validation_mask((2, 3)).tolist() == [True, False, True, False, True, False]
    eva = fixed_validation_mask((16, 16))
    assert eva.dtype == torch.bool and eva.shape == (256,)
    assert int(eva.sum()) == 128
    assert torch.equal(eva.nonzero().flatten(), torch.arange(0, 256, 2))
    assert int(fixed_validation_mask((3, 3)).sum()) == 5  # odd count: the ceil(9 / 2) even indices


def test_budget_from_ratio():
    assert BlockMaskGenerator.from_ratio((16, 16), 105 / 256).num_masking_patches == 105
    assert BlockMaskGenerator.from_ratio((16, 16), 0.4).num_masking_patches == 102
    assert BlockMaskGenerator.from_ratio((12, 20), 0.4).num_masking_patches == 96


def test_defaults_are_eva():
    generator = BlockMaskGenerator()
    assert generator.grid == (16, 16) and generator.num_masking_patches == 105
    assert generator.min_num_patches == 16 and generator.min_aspect == 0.3 and generator.attempts == 10
    assert generator == BlockMaskGenerator([16, 16], 105)  # a list grid is normalised to a tuple


def test_max_num_patches_caps_each_block():
    generator = BlockMaskGenerator(max_num_patches=20)
    rng = np.random.default_rng(6)
    blocks = [block for _ in range(200) for block in generator.sample_blocks(rng)[1]]
    assert max(block.newly_masked for block in blocks) == 20
    assert all(block.budget <= 20 for block in blocks)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"grid": (16, 16), "num_masking_patches": 257},
            "num_masking_patches=257 must be between 1 and the 256",
        ),
        ({"num_masking_patches": 0}, "num_masking_patches=0"),
        ({"min_aspect": 0.0}, "min_aspect=0.0 must be > 0"),
        ({"min_aspect": -1.0}, "min_aspect=-1.0 must be > 0"),
        ({"grid": (4, 4), "num_masking_patches": 6}, "min_num_patches=16 must be between 1 and 9"),
        ({"grid": (1, 16), "num_masking_patches": 6}, "both sides >= 2"),
        ({"min_aspect": 2.0, "max_aspect": 1.0}, "max_aspect=1.0 must be >= min_aspect=2.0"),
        ({"attempts": 0}, "attempts=0 must be >= 1"),
        ({"max_num_patches": 0}, "max_num_patches=0 must be >= 1"),
    ],
)
def test_invalid_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockMaskGenerator(**kwargs)


def test_invalid_ratio_raises():
    with pytest.raises(ValueError, match=r"mask_ratio=1.5 must be in \(0, 1\]"):
        BlockMaskGenerator.from_ratio((16, 16), 1.5)
