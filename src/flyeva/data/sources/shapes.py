"""`type: synthetic`: coloured rectangles and ellipses, no targets; a stand-in for tests and benchmarks."""

import random

from PIL import Image, ImageDraw

from flyeva.data.sources import SourceConfig, register


class SyntheticShapesSource:
    """A few coloured rectangles and ellipses on a plain background; image `index` depends only on
    (seed, index), never on call order."""

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        if num_samples <= 0 or image_size <= 0:
            raise ValueError(
                f"SyntheticShapesSource needs num_samples > 0 and image_size > 0, "
                f"got {num_samples} and {image_size}"
            )
        self.num_samples = num_samples
        self.image_size = image_size
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def key(self, index: int) -> str:
        return f"synthetic-{index:08d}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"synthetic index {index} out of range [0, {self.num_samples})")
        rng = random.Random(self.seed * 1_000_003 + index)
        size = self.image_size

        def colour() -> tuple[int, int, int]:
            return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

        image = Image.new("RGB", (size, size), colour())
        draw = ImageDraw.Draw(image)
        for _ in range(rng.randint(1, 4)):
            x0, x1 = sorted(rng.randrange(size) for _ in range(2))
            y0, y1 = sorted(rng.randrange(size) for _ in range(2))
            shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
            shape((x0, y0, x1, y1), fill=colour())
        return image


@register("synthetic", keys=("num_samples", "image_size", "seed"))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> SyntheticShapesSource:
    return SyntheticShapesSource(config.num_samples, config.image_size or 64, config.seed)
