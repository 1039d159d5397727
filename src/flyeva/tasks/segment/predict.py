"""`flyeva segment predict IMAGES --weights DIR`: overlays to look at, and `segment_image` (docs/segment.md).

Per image: `<stem>.png`, the prediction over the image (beside the ground truth when a label file
exists), scaled up for small images, with a legend; `<stem>_labels.png`, the class indices as a
paletted PNG in PASCAL VOC's fixed colour map, as mmseg and the VOC label files use it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from flyeva.data.sources import UnreadableImageError, UnreadableTargetError, decode_rgb, input_images
from flyeva.tasks.segment.config import resolve
from flyeva.tasks.segment.data import SegmentationPairs, label_lookup
from flyeva.tasks.segment.evaluate import EvalSection, predict_probabilities
from flyeva.tasks.segment.run import load_segmenter
from flyeva.tasks.segment.transforms import normalize

OVERLAY_ALPHA = 0.5  # share of the class colour in the overlay
MIN_SIDE = 512  # smaller pictures are scaled up by a whole factor to at least this long side
LEGEND_ROW, SWATCH, MARGIN = 24, 16, 8  # legend layout in pixels


def voc_palette() -> np.ndarray:
    """PASCAL VOC's colour map, [256, 3] uint8: index bits spread over R, G, B from the high bit down."""
    index = np.arange(256)
    colours = np.zeros((256, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


PALETTE = voc_palette()


def paletted(labels: np.ndarray) -> Image.Image:
    """Class indices as a mode "P" image with PALETTE: the values stay the indices, viewers show colours."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(PALETTE.tobytes())
    return image


def legend(width: int, entries: list[tuple[int, str]], font: ImageFont.ImageFont) -> Image.Image:
    """A white strip of (colour swatch, class name) entries in rows that fit `width`."""
    cell = SWATCH + 6 + max((int(font.getlength(name)) for _, name in entries), default=0) + 2 * MARGIN
    per_row = max(1, (width - MARGIN) // cell)
    strip = Image.new("RGB", (width, LEGEND_ROW * math.ceil(len(entries) / per_row) + MARGIN), "white")
    draw = ImageDraw.Draw(strip)
    for n, (k, name) in enumerate(entries):
        x, y = MARGIN + (n % per_row) * cell, MARGIN // 2 + (n // per_row) * LEGEND_ROW
        draw.rectangle((x, y, x + SWATCH - 1, y + SWATCH - 1), fill=tuple(int(c) for c in PALETTE[k]))
        draw.text((x + SWATCH + 6, y), name, fill="black", font=font)
    return strip


def picture(image: Image.Image, prediction: np.ndarray, classes: list[str], truth: np.ndarray | None = None):
    """The prediction over the image (and the ground truth to its right), scaled up, legend below."""
    factor = max(1, math.ceil(MIN_SIDE / max(image.size)))
    size = (image.width * factor, image.height * factor)
    shown = [("prediction", prediction), *([("ground truth", truth)] if truth is not None else [])]
    font = ImageFont.load_default(size=14)
    present = sorted({int(k) for _, labels in shown for k in np.unique(labels) if k < len(classes)})
    strip = legend(size[0] * len(shown), [(k, classes[k]) for k in present], font)
    canvas = Image.new("RGB", (size[0] * len(shown), size[1] + strip.height), "white")
    for n, (title, labels) in enumerate(shown):
        blended = (1 - OVERLAY_ALPHA) * np.asarray(image, dtype=np.float32) + OVERLAY_ALPHA * PALETTE[labels]
        panel = Image.fromarray(blended.round().astype(np.uint8)).resize(size, Image.Resampling.NEAREST)
        ImageDraw.Draw(panel).text(
            (4, 2), title, fill="white", font=font, stroke_width=2, stroke_fill="black"
        )
        canvas.paste(panel, (n * size[0], 0))
    canvas.paste(strip, (0, size[1]))
    return canvas


@torch.no_grad()
def segment_image(model: torch.nn.Module, image: Image.Image | torch.Tensor, cfg: EvalSection | None = None):
    """[H, W] long class indices of one image (a PIL image or uint8 [3, H, W] RGB) at its own size.

    As `segment eval` reads it: ImageNet mean/std; by default mmseg's test setting for the model's
    crop (short side to the crop, sliding windows of the crop at a stride of 2/3 crop)."""
    pixels = normalize(image if isinstance(image, Image.Image) else image.float())[None]
    crop = model.backbone.size.img_size
    cfg = cfg or EvalSection(mode="slide", crop_size=crop, stride=crop * 2 // 3, scale=[4 * crop, crop])
    device = next(model.parameters()).device
    scores = predict_probabilities(
        model.eval(), pixels.to(device), model.num_classes, cfg, model.backbone.size_divisor,
        model.scores_are_probabilities,
    )  # fmt: skip
    return scores.argmax(1)[0].cpu()


def ground_truth(file: Path, image: Image.Image, cfg: Any, classes: list[str]) -> np.ndarray | None:
    """The label of `file` when its dataset layout has one (images/ -> labels/ or annotations/), else None."""
    parts = file.parts
    if "images" not in parts:
        return None
    at = len(parts) - 1 - parts[::-1].index("images")
    zero_ignore = cfg.data.reduce_zero_label or cfg.data.format == "ade20k"
    lookup = label_lookup(len(classes), zero_ignore, cfg.data.format == "cocostuff" and cfg.data.raw_ids)
    for folder in ("labels", "annotations"):
        label = Path(*parts[:at], folder, *parts[at + 1 : -1], f"{file.stem}.png")
        if label.is_file():
            try:
                return SegmentationPairs([(file, label)], classes, lookup).load_label(0, image.size)
            except UnreadableTargetError:
                return None
    return None


def run_predict(cfg: Any, weights: str, images: list[str], out_dir: str) -> list[Path]:
    """Predict every image; write <stem>.png (the picture), <stem>_labels.png (paletted) and legend.json."""
    cfg = resolve(cfg)
    files = input_images(images)
    model = load_segmenter(weights).eval()
    classes = model.weights_config.get("classes") or [str(k) for k in range(model.num_classes)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        try:
            image = decode_rgb(file)
        except UnreadableImageError as error:
            print(f"skipping {file}: {error}")
            continue
        prediction = segment_image(model, image, cfg.eval).numpy().astype(np.uint8)
        written.append(out / f"{file.stem}.png")
        picture(image, prediction, classes, ground_truth(file, image, cfg, classes)).save(written[-1])
        paletted(prediction).save(out / f"{file.stem}_labels.png")
    legend_colours = {name: PALETTE[k].tolist() for k, name in enumerate(classes)}
    (out / "legend.json").write_text(json.dumps(legend_colours, indent=1) + "\n")
    return written
