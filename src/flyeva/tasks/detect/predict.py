"""`flyeva detect predict IMAGES --weights DIR`: boxes, masks and labels drawn onto PNGs for a person."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode

from flyeva.data.sources import UnreadableImageError, decode_rgb, input_images
from flyeva.tasks.detect.config import DetectConfig
from flyeva.tasks.detect.transforms import ResizeLongestSide

logger = logging.getLogger(__name__)

MIN_SIDE = 512  # smaller images are scaled up by a whole factor to at least this long side


def upscale_factor(height: int, width: int) -> int:
    """The whole factor that brings the long side to at least MIN_SIDE (labels stay readable)."""
    return max(1, math.ceil(MIN_SIDE / max(height, width)))


def colour(label: int) -> tuple[int, int, int]:
    """A fixed colour per class, far from its neighbours' (detectron2's Visualizer also keys by class)."""
    return ((37 * label + 80) % 256, (97 * label + 40) % 256, (173 * label + 120) % 256)


def draw(image: torch.Tensor, detection: dict[str, torch.Tensor], class_names: list[str], threshold: float):
    """uint8 [3, H, W] -> the image scaled up for small inputs (upscale_factor), with the detections
    scoring at least `threshold`: masks, boxes and a 'label score' tag on a box-coloured background."""
    from PIL import ImageDraw, ImageFont
    from torchvision.transforms.functional import resize, to_pil_image
    from torchvision.utils import draw_segmentation_masks

    factor = upscale_factor(*image.shape[-2:])
    size = [image.shape[-2] * factor, image.shape[-1] * factor]
    image = resize(image, size, InterpolationMode.NEAREST)
    keep = detection["scores"] >= threshold
    labels = detection["labels"][keep].tolist()
    colours = [colour(k) for k in labels]
    if "masks" in detection and keep.any():
        masks = resize(detection["masks"][keep].cpu().to(torch.uint8), size, InterpolationMode.NEAREST).bool()
        image = draw_segmentation_masks(image, masks, alpha=0.45, colors=colours)
    picture = to_pil_image(image)
    canvas, font = ImageDraw.Draw(picture), ImageFont.load_default(size=14)
    scores = detection["scores"][keep].tolist()
    for box, k, score, rgb in zip((detection["boxes"][keep] * factor).tolist(), labels, scores, colours):
        canvas.rectangle(box, outline=rgb, width=2)
        text, corner = f"{class_names[k]} {score:.2f}", (box[0], max(box[1], 18))  # tag above the box
        left, top, right, bottom = canvas.textbbox(corner, text, font=font, anchor="lb")
        canvas.rectangle((left - 2, top - 2, right + 2, bottom), fill=rgb)
        canvas.text(corner, text, fill="white", font=font, anchor="lb", stroke_width=1, stroke_fill="black")
    return picture


@torch.no_grad()
def run_predict(cfg: DetectConfig, images: list[str], out_dir: str, threshold: float = 0.5) -> list[Path]:
    """Draw the detections of `model.init` on each image; returns the written PNGs."""
    from flyeva.engine import distributed as D
    from flyeva.tasks.detect.run import _load_detector

    paths = input_images(images)
    model, config = _load_detector(cfg)
    device = D.init_distributed(cfg.train.device)
    model.to(device).square_size = cfg.test.size
    class_names = config.get("classes") or [str(k) for k in range(model.roi_heads.cfg.num_classes)]
    resize, out = ResizeLongestSide(cfg.test.size), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        try:
            image = decode_rgb(path)
        except UnreadableImageError as error:
            logger.warning("skipping %s: %s", path, error)
            continue
        detection = model([resize(image).to(device)], original_sizes=[(image.height, image.width)])[0]
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
        target = out / f"{path.stem}.png"
        draw(pixels, {k: v.cpu() for k, v in detection.items()}, class_names, threshold).save(target)
        written.append(target)
    return written
