"""`flyeva segment predict IMAGES --weights DIR --out DIR`: colour overlays a person can look at."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flyeva.data.sources import UnreadableImageError, decode_rgb, input_images
from flyeva.tasks.segment.evaluate import predict_probabilities
from flyeva.tasks.segment.transforms import normalize

OVERLAY_ALPHA = 0.5  # share of the class colour in the overlay


def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class, [C, 3] uint8 (the same for every run)."""
    return np.random.default_rng(2023).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def overlay(image: Image.Image, prediction: np.ndarray, colours: np.ndarray) -> Image.Image:
    blended = (1 - OVERLAY_ALPHA) * np.asarray(image, dtype=np.float32) + OVERLAY_ALPHA * colours[prediction]
    return Image.fromarray(blended.round().astype(np.uint8))


@torch.no_grad()
def run_predict(cfg: Any, weights: str, images: list[str], out_dir: str) -> list[Path]:
    """Predict every image; write <stem>.png (overlay), <stem>_labels.png (class indices) and legend.json."""
    from flyeva.tasks.segment.config import resolve
    from flyeva.tasks.segment.run import load_segmenter

    cfg = resolve(cfg)
    files = input_images(images)
    model = load_segmenter(weights).eval()
    classes = model.weights_config.get("classes") or [str(k) for k in range(model.num_classes)]
    colours = palette(model.num_classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        try:
            image = decode_rgb(file)
        except UnreadableImageError as error:
            print(f"skipping {file}: {error}")
            continue
        scores = predict_probabilities(
            model,
            normalize(image)[None],
            model.num_classes,
            cfg.eval,
            model.backbone.size_divisor,
            model.scores_are_probabilities,
        )
        prediction = scores.argmax(1)[0].numpy().astype(np.uint8)
        overlay(image, prediction, colours).save(out / f"{file.stem}.png")
        Image.fromarray(prediction).save(out / f"{file.stem}_labels.png")
        written.append(out / f"{file.stem}.png")
    legend = {name: colours[k].tolist() for k, name in enumerate(classes)}
    (out / "legend.json").write_text(json.dumps(legend, indent=1) + "\n")
    return written
