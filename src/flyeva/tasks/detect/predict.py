"""`flyeva detect predict IMAGES --out DIR`: boxes, masks and labels drawn onto PNGs for a person."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from flyeva.data.sources import UnreadableImageError, decode_rgb, input_images
from flyeva.tasks.detect.config import DetectConfig
from flyeva.tasks.detect.transforms import ResizeLongestSide

logger = logging.getLogger(__name__)


def draw(image: torch.Tensor, detection: dict[str, torch.Tensor], class_names: list[str], threshold: float):
    """uint8 [3, H, W] with the detections scoring at least `threshold`: masks, boxes, 'label score'."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = detection["scores"] >= threshold
    labels = detection["labels"][keep].tolist()
    colours = [((37 * k + 80) % 256, (97 * k + 40) % 256, (173 * k + 120) % 256) for k in labels]
    if "masks" in detection and keep.any():
        image = draw_segmentation_masks(image, detection["masks"][keep].cpu(), alpha=0.45, colors=colours)
    captions = [f"{class_names[k]} {s:.2f}" for k, s in zip(labels, detection["scores"][keep].tolist())]
    return draw_bounding_boxes(image, detection["boxes"][keep].cpu(), captions, colours, width=2)


@torch.no_grad()
def run_predict(cfg: DetectConfig, images: list[str], out_dir: str, threshold: float = 0.5) -> list[Path]:
    """Draw the detections of `model.init` on each image; returns the written PNGs."""
    from PIL import Image

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
        drawn = draw(pixels, {k: v.cpu() for k, v in detection.items()}, class_names, threshold)
        target = out / f"{path.stem}.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(target)
        written.append(target)
    return written
