"""Masks per second of BlockMaskGenerator on one core, and its mean masked fraction.

    python benchmarks/masking_speed.py [--masks 20000] [--no-release]

With the release column, the straight port of the release's generator (python `random`, per-pixel
fill) kept in tests/test_masking.py is timed too, for speed and mean-fraction parity.
"""

from __future__ import annotations

import argparse
import functools
import random
import sys
import time
from pathlib import Path

import numpy as np

from flyeva.data.masking import BlockMaskGenerator

# (grid, budget, min_num_patches): EVA's 224/14 grid first (docs/recipes.md §3).
CASES = [((16, 16), 105, 16), ((14, 14), 78, 16), ((8, 8), 25, 4), ((12, 20), 96, 16), ((32, 32), 420, 16)]


def time_masks(make_mask, num_masks: int) -> tuple[float, float]:
    """Seconds per mask and mean masked fraction over `num_masks` calls."""
    start = time.perf_counter()
    fractions = [make_mask().mean() for _ in range(num_masks)]
    return (time.perf_counter() - start) / num_masks, float(np.mean(fractions))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--masks", type=int, default=20000, help="masks per row")
    parser.add_argument("--no-release", action="store_true", help="skip the release port (slower)")
    args = parser.parse_args()
    if not args.no_release:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from test_masking import ReleaseMaskingGenerator

    print(f"{'grid':>8} {'budget':>6} {'variant':>15} {'masks/s':>9} {'us/mask':>8} {'mean frac':>10}")
    for grid, budget, min_patches in CASES:
        rows = []
        for strict in (False, True):
            generator = BlockMaskGenerator(grid, budget, min_num_patches=min_patches, strict_min_area=strict)
            make_mask = functools.partial(generator, np.random.default_rng(0))
            rows.append(("strict_min_area" if strict else "flyeva", time_masks(make_mask, args.masks)))
        if not args.no_release:
            port = ReleaseMaskingGenerator(grid, budget, min_patches, random_source=random.Random(0))
            rows.append(("release port", time_masks(port, args.masks)))
        for name, (seconds, fraction) in rows:
            grid_text = f"{grid[0]}x{grid[1]}"
            speed = f"{1 / seconds:>9.0f} {seconds * 1e6:>8.1f}"
            print(f"{grid_text:>8} {budget:>6} {name:>15} {speed} {fraction:>10.5f}")


if __name__ == "__main__":
    main()
