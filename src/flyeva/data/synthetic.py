"""ShapeWorld: a procedurally generated miniature world for every EVA task on 2 CPU cores (docs/demo.md).

A scene (1-4 lit, upright shapes on a dark background, later ones occluding earlier ones) is a pure
function of (seed, index), built on the fly, and carries the labels of every task:
- MIM / CLIP: the image and a caption that names only what defines the class ("a large star in the
  top left"): colour, fill and background words let a contrastive model match captions without
  seeing the class, and the small shapes gave the miniature CLIP nothing to learn (docs/demo.md).
- Classification: 20 classes = shape of the largest object x the quadrant of its centre. Colours,
  fills and backgrounds are independent of the class and all shapes of one size have one area, so
  colour histograms carry no class information.
- Detection / segmentation: visible (post-occlusion) masks, tight xyxy boxes, categories = shape ids
  from 1 (COCO style), and a uint8 semantic map (0 = background, c = the topmost object's category).
- Video: `clip(index)` moves, turns, grows or shrinks one shape; the action is the label.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "white": (245, 245, 245),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
TEXTURES = ("solid", "striped", "checkered")
BACKGROUNDS = ("plain", "gradient", "checkered", "noisy")
ACTIONS = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "rotating clockwise",
    "rotating counter-clockwise",
    "growing",
    "shrinking",
)

# Sizes are the radius of the circle with the object's area, as a fraction of the image side. The
# ranges do not overlap, so "the largest object" (which defines the class) is never ambiguous.
# The class object is as large as fits its quadrant: a triangle of size 0.29 reaches 1.555 x 0.29 =
# 0.45 of the side from its centre, inside the quadrant's 0.46. A from-scratch miniature ViT learns
# the class twice as fast as at 0.2-0.25 (docs/demo.md).
LARGEST_SIZE = (0.25, 0.29)
OTHER_SIZE = (0.055, 0.09)
CLIP_SIZE = (0.09, 0.12)
# An occluded object keeps at least this fraction of its pixels, so every annotated object is visible.
MIN_VISIBLE_FRACTION = 0.5
PLACEMENT_ATTEMPTS = 30
COLOUR_JITTER = 20
TEXTURE_SHADE = 0.7  # stripes/checks are the object's colour darkened to this fraction
# Scene objects stand upright up to this tilt; free rotation kept a from-scratch ViT at chance on
# the shape for 400 steps, upright shapes it learns (docs/demo.md). Clips still rotate.
MAX_TILT = math.radians(20)
# Dark backgrounds keep every shape brighter than its surroundings: with mid-grey ones (50-170) a
# shape's edges flip polarity with its colour and a from-scratch ViT stayed at chance (docs/demo.md).
BACKGROUND_GREY = (10, 50)
BACKGROUND_CONTRAST = (15, 40)


# Shapes of size r have the area of a circle of radius r (pi r^2), so size, not shape, sets the pixel count.
SQUARE_HALF_SIDE = math.sqrt(math.pi) / 2
TRIANGLE_CIRCUMRADIUS = math.sqrt(4 * math.pi / (3 * math.sqrt(3)))
STAR_OUTER = math.sqrt(math.pi / (2.5 * math.sin(math.pi / 5)))  # 5 points, inner radius = outer / 2
CROSS_ARM = math.sqrt(9 * math.pi / 20)  # plus sign with arms a long and a/3 half-wide: area 20/9 a^2
# Farthest point from the centre per unit size: keeps whole shapes inside the frame.
EXTENT = {
    "circle": 1.0,
    "square": SQUARE_HALF_SIDE * math.sqrt(2),
    "triangle": TRIANGLE_CIRCUMRADIUS,
    "star": STAR_OUTER,
    "cross": CROSS_ARM * math.hypot(1, 1 / 3),
}


def _star_edge() -> tuple[float, float]:
    """Angle and distance from the centre of the line from a unit star's tip to the next inner corner."""
    tip = np.array([STAR_OUTER, 0.0])
    inner = STAR_OUTER / 2 * np.array([math.cos(math.pi / 5), math.sin(math.pi / 5)])
    direction = inner - tip
    normal = np.array([direction[1], -direction[0]])  # points away from the centre
    normal /= np.linalg.norm(normal)
    return math.atan2(normal[1], normal[0]), float(normal @ tip)


STAR_EDGE_ANGLE, STAR_EDGE_DISTANCE = _star_edge()


def shape_mask(
    shape: str, position: tuple[float, float], size: float, angle: float, image_size: int
) -> np.ndarray:
    """Bool [H, W] mask of the pixels whose centres lie inside the shape (exact, sub-pixel placement).

    `angle` turns the shape clockwise on screen (image y points down); at 0 triangles and stars
    point up and squares and crosses are axis-aligned.
    """
    cx, cy = position
    reach = EXTENT[shape] * size
    x0, x1 = max(0, math.floor(cx - reach)), min(image_size, math.ceil(cx + reach) + 1)
    y0, y1 = max(0, math.floor(cy - reach)), min(image_size, math.ceil(cy + reach) + 1)
    mask = np.zeros((image_size, image_size), dtype=bool)
    if x0 >= x1 or y0 >= y1:
        return mask
    u = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :] / size
    v = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None] / size
    if shape == "circle":
        inside = u * u + v * v <= 1.0
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        along, across = u * cos + v * sin, v * cos - u * sin  # coordinates in the shape's own frame
        if shape == "square":
            inside = (np.abs(along) <= SQUARE_HALF_SIDE) & (np.abs(across) <= SQUARE_HALF_SIDE)
        elif shape == "triangle":  # inside all three edges, whose normals point down, up-left, up-right
            inside = np.ones(along.shape, dtype=bool)
            for edge in range(3):
                normal = math.pi / 2 + edge * 2 * math.pi / 3
                inside &= along * math.cos(normal) + across * math.sin(normal) <= TRIANGLE_CIRCUMRADIUS / 2
        elif shape == "star":  # fold the plane into one half-point sector, where the edge is one line
            sector = np.mod(np.arctan2(across, along) + math.pi / 2, 2 * math.pi / 5)
            sector = np.minimum(sector, 2 * math.pi / 5 - sector)
            radius = np.hypot(along, across)
            inside = radius * np.cos(sector - STAR_EDGE_ANGLE) <= STAR_EDGE_DISTANCE
        elif shape == "cross":
            along, across = np.abs(along), np.abs(across)
            half_width = CROSS_ARM / 3
            inside = ((along <= CROSS_ARM) & (across <= half_width)) | (
                (along <= half_width) & (across <= CROSS_ARM)
            )
        else:
            raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask[y0:y1, x0:x1] = inside
    return mask


@lru_cache(maxsize=16)
def _ramps(size: int) -> tuple[np.ndarray, ...]:
    """Horizontal, vertical and diagonal 0..1 ramps for gradient backgrounds."""
    line = np.linspace(0.0, 1.0, size, dtype=np.float32)
    horizontal = np.broadcast_to(line[None, :], (size, size))
    vertical = np.broadcast_to(line[:, None], (size, size))
    return horizontal, vertical, (horizontal + vertical) / 2


@lru_cache(maxsize=64)
def _pattern_tile(size: int, kind: str, cell: int) -> np.ndarray:
    """A bool pattern one period larger than the image, sliced at an offset to move it."""
    grid = np.arange(size + 2 * cell)
    if kind == "striped":  # diagonal stripes
        return ((grid[:, None] + grid[None, :]) // cell) % 2 == 1
    return ((grid[:, None] // cell) + (grid[None, :] // cell)) % 2 == 1


@lru_cache(maxsize=16)
def _noise_tile(size: int) -> np.ndarray:
    # Fixed, seed-independent noise; each image uses it at a random offset.
    return np.random.default_rng(0).integers(-24, 25, size=(2 * size, 2 * size, 1), dtype=np.int16)


def _pattern(size: int, kind: str, offset_x: int, offset_y: int) -> np.ndarray:
    cell = max(2, size // 16)
    tile = _pattern_tile(size, kind, cell)
    period = 2 * cell
    y, x = offset_y % period, offset_x % period
    return tile[y : y + size, x : x + size]


@dataclass
class Scene:
    """One annotated ShapeWorld image; per-object arrays are in drawing order (bottom first)."""

    image: Image.Image
    caption: str
    label: int
    class_name: str
    boxes: np.ndarray  # float32 [n, 4] xyxy pixel edges, tight around the visible mask
    masks: np.ndarray  # bool [n, H, W], visible part after occlusion
    categories: np.ndarray  # int64 [n], shape index + 1
    semantic: np.ndarray  # uint8 [H, W], 0 background, else the topmost object's category
    objects: list[dict[str, Any]]


@dataclass
class Clip:
    """A short video of one shape doing `action_name`; `masks`/`objects` follow that shape per frame."""

    frames: list[Image.Image]
    action: int
    action_name: str
    caption: str
    masks: np.ndarray  # bool [T, H, W] of the acting shape (drawn on top, so fully visible)
    objects: list[dict[str, Any]]


@dataclass(frozen=True)
class ShapeWorld:
    """Deterministic generator of ShapeWorld scenes and clips: `sample(index)` and `clip(index)` depend
    only on (seed, index, the fields). A scene has min_objects..max_objects objects (uniform); one that
    cannot be placed in 30 tries without hiding half of any object is left out (not seen in 300 scenes
    of 8 objects at 32 or 64 px)."""

    image_size: int = 64
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 4
    num_frames: int = 8

    QUADRANTS: ClassVar[tuple[str, ...]] = QUADRANTS

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(
                f"ShapeWorld needs image_size >= 32 (small shapes vanish below that), got {self.image_size}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise ValueError(
                f"ShapeWorld needs 1 <= min_objects <= max_objects <= 8, "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if self.num_frames < 2:
            raise ValueError(f"ShapeWorld clips need num_frames >= 2, got {self.num_frames}")
        if self.seed < 0:
            raise ValueError(f"ShapeWorld seed must be >= 0, got {self.seed}")

    @property
    def class_names(self) -> list[str]:
        """Label = shape index * 4 + quadrant index, e.g. 9 = "triangle in the top right"."""
        return [f"{shape} in the {quadrant}" for shape in SHAPES for quadrant in QUADRANTS]

    @property
    def num_classes(self) -> int:
        return len(SHAPES) * len(QUADRANTS)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return [{"id": k + 1, "name": shape, "supercategory": "shape"} for k, shape in enumerate(SHAPES)]

    @property
    def action_names(self) -> list[str]:
        return list(ACTIONS)

    @staticmethod
    def label_of(objects: list[dict[str, Any]], image_size: int) -> int:
        """The class of a scene: shape of its largest object x the quadrant of that object's centre."""
        largest = max(objects, key=lambda obj: obj["size"])
        x, y = largest["position"]
        quadrant = 2 * (y >= image_size / 2) + (x >= image_size / 2)
        return SHAPES.index(largest["shape"]) * len(QUADRANTS) + int(quadrant)

    def _rng(self, index: int, stream: int) -> random.Random:
        if index < 0:
            raise IndexError(f"ShapeWorld index must be >= 0, got {index}")
        return random.Random((self.seed << 66) | (index << 2) | stream)

    def _rasterize(self, obj: dict[str, Any]) -> np.ndarray:
        return shape_mask(obj["shape"], obj["position"], obj["size"], obj["angle"], self.image_size)

    def _anywhere(self, rng: random.Random, reach: float) -> tuple[float, float]:
        """A uniform centre that keeps a shape of this reach inside the frame (x drawn first)."""
        return rng.uniform(reach, self.image_size - reach), rng.uniform(reach, self.image_size - reach)

    def _new_object(self, rng: random.Random, shape: str, size_range: tuple[float, float]) -> dict[str, Any]:
        colour = rng.choice(list(COLOURS))
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[colour])
        return {
            "shape": shape,
            "colour": colour,
            "rgb": rgb,
            "texture": rng.choice(TEXTURES),
            "size": rng.uniform(*size_range) * self.image_size,
            "angle": rng.uniform(-MAX_TILT, MAX_TILT),
        }

    def _background(self, rng: random.Random) -> np.ndarray:
        size = self.image_size
        kind = rng.choice(BACKGROUNDS)
        grey = rng.randint(*BACKGROUND_GREY)
        tone = np.array([grey + rng.randint(-8, 8) for _ in range(3)], dtype=np.float32)
        other = tone + rng.randint(*BACKGROUND_CONTRAST)
        if kind == "plain":
            pixels = np.broadcast_to(tone, (size, size, 3))
        elif kind == "gradient":
            ramp = _ramps(size)[rng.randrange(3)][..., None]
            pixels = tone + (other - tone) * ramp
        elif kind == "checkered":
            cell = max(2, size // rng.choice((4, 8)))
            checks = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2)[..., None]
            pixels = np.where(checks == 1, other, tone)
        else:
            noise = _noise_tile(size)
            y, x = rng.randrange(size), rng.randrange(size)
            pixels = tone + noise[y : y + size, x : x + size]
        return np.clip(pixels, 0, 255).astype(np.uint8)

    def _paint(self, pixels: np.ndarray, obj: dict[str, Any], mask: np.ndarray) -> None:
        rgb = np.array(obj["rgb"], dtype=np.uint8)
        if obj["texture"] == "solid":
            pixels[mask] = rgb
            return
        x, y = obj["position"]
        shaded = mask & _pattern(self.image_size, obj["texture"], round(x), round(y))
        pixels[mask] = rgb
        pixels[shaded] = (rgb * TEXTURE_SHADE).astype(np.uint8)

    def _place(self, index: int) -> tuple[list[dict], list[np.ndarray], np.ndarray, int]:
        """Objects in drawing order with full masks, the background, and the class label."""
        rng = self._rng(index, stream=0)
        size = self.image_size
        label = rng.randrange(self.num_classes)  # uniform classes
        shape_index, quadrant = divmod(label, len(QUADRANTS))
        largest = self._new_object(rng, SHAPES[shape_index], LARGEST_SIZE)
        # Keep the centre 4% of the side away from the midlines so that its quadrant is unambiguous.
        margin, reach = 0.04 * size, EXTENT[largest["shape"]] * largest["size"]
        low, high = (reach, size / 2 - margin), (size / 2 + margin, size - reach)
        largest["position"] = (
            rng.uniform(*(high if quadrant % 2 else low)),
            rng.uniform(*(high if quadrant >= 2 else low)),
        )
        placed = [(rng.random(), largest, self._rasterize(largest))]  # (depth, object, full mask)
        for _ in range(rng.randint(self.min_objects, self.max_objects) - 1):
            candidate = self._new_object(rng, rng.choice(SHAPES), OTHER_SIZE)
            depth, reach = rng.random(), EXTENT[candidate["shape"]] * candidate["size"]
            for _ in range(PLACEMENT_ATTEMPTS):
                candidate["position"] = self._anywhere(rng, reach)
                trial = sorted([*placed, (depth, candidate, self._rasterize(candidate))], key=lambda p: p[0])
                full = np.stack([mask for _, _, mask in trial])
                if _visible_fraction(full).min() >= MIN_VISIBLE_FRACTION:
                    placed = trial
                    break
        return [obj for _, obj, _ in placed], [mask for _, _, mask in placed], self._background(rng), label

    def _compose(
        self, objects: list[dict], full_masks: list[np.ndarray], background: np.ndarray
    ) -> Image.Image:
        pixels = background.copy()
        for obj, mask in zip(objects, full_masks):
            self._paint(pixels, obj, mask)
        return Image.fromarray(pixels)

    def label(self, index: int) -> int:
        """The class of scene `index` without drawing it (the first draw of its random stream)."""
        return self._rng(index, stream=0).randrange(self.num_classes)

    def caption(self, index: int) -> str:
        """The caption of scene `index` (same as `sample(index).caption`) without drawing the image."""
        objects, _, _, _ = self._place(index)
        return self._caption(objects)

    def render(self, index: int) -> Image.Image:
        """Only the image of scene `index` (identical to `sample(index).image`), for fast pretraining."""
        objects, full_masks, background, _ = self._place(index)
        return self._compose(objects, full_masks, background)

    def sample(self, index: int) -> Scene:
        """Scene `index` with every annotation."""
        objects, full_masks, background, label = self._place(index)
        owner = _owner_map(np.stack(full_masks))
        masks = owner[None] == np.arange(len(objects))[:, None, None]
        categories = np.array([SHAPES.index(obj["shape"]) + 1 for obj in objects], dtype=np.int64)
        semantic = np.concatenate([[0], categories]).astype(np.uint8)[owner + 1]
        boxes = np.stack([_tight_box(mask) for mask in masks]).astype(np.float32)
        public = [
            {key: obj[key] for key in ("shape", "colour", "rgb", "texture", "size", "position", "angle")}
            | {"visible_pixels": int(mask.sum()), "full_pixels": int(whole.sum())}
            for obj, mask, whole in zip(objects, masks, full_masks)
        ]
        return Scene(
            image=self._compose(objects, full_masks, background),
            caption=self._caption(public),
            label=label,
            class_name=self.class_names[label],
            boxes=boxes,
            masks=masks,
            categories=categories,
            semantic=semantic,
            objects=public,
        )

    def _caption(self, objects: list[dict[str, Any]]) -> str:
        """The class in words; see the module docstring for what is left out and why."""
        return f"a large {self.class_names[self.label_of(objects, self.image_size)]}"

    def clip(self, index: int) -> Clip:
        """Clip `index`: one shape (on top of 0-2 still ones) doing one of `action_names`."""
        rng = self._rng(index, stream=1)
        size, steps = self.image_size, self.num_frames - 1
        action = rng.randrange(len(ACTIONS))
        name = ACTIONS[action]
        # A circle looks the same at every angle, so rotations use the other shapes.
        actor = self._new_object(rng, rng.choice(SHAPES[1:] if "rotating" in name else SHAPES), CLIP_SIZE)
        growth = rng.uniform(1.7, 2.0) if name in ("growing", "shrinking") else 1.0
        if name == "shrinking":
            actor["size"] *= growth
            growth = 1 / growth
        reach = EXTENT[actor["shape"]] * actor["size"] * max(1.0, growth)
        start = list(self._anywhere(rng, reach))
        shift = [0.0, 0.0]
        if name.startswith("moving"):
            axis = 0 if name in ("moving left", "moving right") else 1
            distance = rng.uniform(0.25, 0.4) * size * (-1 if name in ("moving left", "moving up") else 1)
            start[axis] = rng.uniform(reach, size - reach - abs(distance)) + max(0.0, -distance)
            shift[axis] = distance
        # Screen y points down, so a growing angle turns the shape clockwise on screen.
        sign = {"rotating clockwise": 1, "rotating counter-clockwise": -1}.get(name, 0)
        turn = math.radians(rng.uniform(60, 90)) * sign
        still = []
        for _ in range(rng.randint(0, 2)):
            obj = self._new_object(rng, rng.choice(SHAPES), OTHER_SIZE)
            obj["position"] = self._anywhere(rng, EXTENT[obj["shape"]] * obj["size"])
            still.append(obj)
        background = self._background(rng)
        base_pixels = np.asarray(self._compose(still, [self._rasterize(obj) for obj in still], background))
        frames, masks, states = [], [], []
        for step in range(self.num_frames):
            progress = step / steps
            state = dict(actor)
            state["position"] = (start[0] + shift[0] * progress, start[1] + shift[1] * progress)
            state["size"] = actor["size"] * (1.0 + (growth - 1.0) * progress)
            state["angle"] = actor["angle"] + turn * progress
            mask = self._rasterize(state)
            pixels = base_pixels.copy()
            self._paint(pixels, state, mask)
            frames.append(Image.fromarray(pixels))
            masks.append(mask)
            states.append(
                {key: state[key] for key in ("shape", "colour", "texture", "size", "position", "angle")}
            )
        texture = "" if actor["texture"] == "solid" else actor["texture"] + " "
        return Clip(
            frames=frames,
            action=action,
            action_name=name,
            caption=f"a {texture}{actor['colour']} {actor['shape']} {name}",
            masks=np.stack(masks),
            objects=states,
        )


def _owner_map(full_masks: np.ndarray) -> np.ndarray:
    """Index of the topmost object at each pixel (-1 = background); masks in drawing order."""
    owner = np.full(full_masks.shape[1:], -1, dtype=np.int64)
    for k, mask in enumerate(full_masks):
        owner[mask] = k
    return owner


def _visible_fraction(full_masks: np.ndarray) -> np.ndarray:
    visible = np.bincount(_owner_map(full_masks).ravel() + 1, minlength=len(full_masks) + 1)[1:]
    return visible / np.maximum(full_masks.sum(axis=(1, 2)), 1)


def _tight_box(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


class ShapeWorldSource:
    """`num_samples` ShapeWorld images as an indexable source; `target(i)` is the class index
    (`target="label"`), the caption (`"caption"`), or absent (None: images only, for pretraining)."""

    def __init__(self, world: ShapeWorld, num_samples: int, target: str | None = None):
        if num_samples <= 0:
            raise ValueError(f"ShapeWorldSource needs num_samples > 0, got {num_samples}")
        if target not in (None, "label", "caption"):
            raise ValueError(f"ShapeWorldSource target must be None, 'label' or 'caption', got {target!r}")
        self.world = world
        self.num_samples = num_samples
        self.target_kind = target
        self.classes = world.class_names if target == "label" else None
        # How ImageBatchStream tells labels (int) from captions (str); None = images only.
        self.target_type = {"label": int, "caption": str}.get(target)

    def __len__(self) -> int:
        return self.num_samples

    def _check(self, index: int) -> None:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapeWorld index {index} out of range [0, {self.num_samples})")

    def key(self, index: int) -> str:
        return f"shapeworld-{self.world.seed}-{index:08d}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        self._check(index)
        return self.world.render(index)

    def target(self, index: int) -> int | str:
        self._check(index)
        if self.target_kind is None:
            raise ValueError("this ShapeWorldSource has no target; build it with target='label' or 'caption'")
        return self.world.label(index) if self.target_kind == "label" else self.world.caption(index)
