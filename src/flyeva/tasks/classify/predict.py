"""`flyeva classify predict IMAGES --weights FOLDER`, and `classify_image`: classification in a few
lines (docs/classify.md)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from flyeva.data.sources import UnreadableImageError, decode_rgb, input_images
from flyeva.data.transforms import EvalTransform
from flyeva.tasks.classify.model import load_classifier


@torch.no_grad()
def classify_image(
    model: nn.Module, image: Image.Image | torch.Tensor, top_k: int = 5
) -> list[tuple[str, float]]:
    """The `top_k` (class name, probability) pairs of one image, best first, with the evaluation's
    preprocessing (short side to the model's size, centre crop, CLIP mean/std: docs/classify.md)."""
    classes = getattr(model, "weights_config", {}).get("classes") or [
        str(k) for k in range(model.num_classes)
    ]
    if isinstance(image, torch.Tensor):  # uint8 [3, H, W], 0-255 RGB
        image = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    pixels = EvalTransform(model.patch_embed.img_size[0])(image.convert("RGB"))[None]
    device = next(model.parameters()).device
    probabilities = model.eval()(pixels.to(device)).float().softmax(-1)[0]
    values, indices = probabilities.topk(min(top_k, len(classes)))
    return [(classes[k], float(v)) for v, k in zip(values.tolist(), indices.tolist())]


def run_predict(weights: str, images: list[str], out: Path, top_k: int = 5) -> Path:
    """Print the top-k table of every image and write OUTPUT/predictions.json; returns its path."""
    files = [file for name in images for file in input_images([name])]  # one JSON: equal stems may meet
    model, _ = load_classifier(weights)
    rows = []
    print(f"{'image':<40} top-{top_k} classes and probabilities")
    for file in files:
        try:
            image = decode_rgb(file)
        except UnreadableImageError as error:
            print(f"skipping {file}: {error}")
            continue
        ranked = classify_image(model, image, top_k)
        rows.append({"image": str(file), "top_k": [{"class": c, "probability": p} for c, p in ranked]})
        print(f"{file!s:<40} " + "  ".join(f"{c} {p:.3f}" for c, p in ranked))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.json"
    path.write_text(json.dumps({"weights": weights, "predictions": rows}, indent=1) + "\n")
    return path
