"""`type: shapeworld`: the miniature world's scenes (`flyeva.data.synthetic`), generated on the fly."""

from flyeva.data.sources import SourceConfig, register
from flyeva.data.synthetic import ShapeWorld, ShapeWorldSource


@register("shapeworld", keys=("num_samples", "image_size", "seed"), targets=("label", "caption"))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> ShapeWorldSource:
    world = ShapeWorld(image_size=config.image_size or 64, seed=config.seed)
    return ShapeWorldSource(world, config.num_samples, target=target)
