"""Inference in a few lines, run as the task docs write it, and the pictures the predict verbs draw.

Each doc's ```python block under its inference heading is executed on a tiny saved model (its
`load("...")` path replaced by the test's folder) and its results are checked against a hand-written
forward pass.
"""

import math
import re
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from conftest import tiny_encoder
from PIL import Image

from flyeva.data.transforms import CLIP_MEAN, CLIP_STD
from flyeva.tasks.segment.predict import PALETTE, paletted, picture

DOCS = Path(__file__).resolve().parents[1] / "docs"


def doc_snippet(doc: str, marker: str, folder: Path) -> str:
    """The ```python block of docs/`doc` that contains `marker`, loading `folder` instead."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / doc).read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return re.sub(r'load\("[^"]+"\)', f'load("{folder}")', block)


def scene(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def as_uint8_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def clip_normalized(image: Image.Image) -> torch.Tensor:
    """A 32 px image as CLIP mean/std pixels, by hand (no resize or crop is needed at the model's size)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None])[None]


def test_classification_in_a_few_lines_as_documented(tmp_path):
    from flyeva.tasks.classify.model import build_classifier, save_classifier

    torch.manual_seed(0)
    classes = ["circle", "square", "star"]
    model = build_classifier(tiny_encoder(32), len(classes), head_init_scale=1.0)
    save_classifier(model, tmp_path / "classifier", extra={"classes": classes})
    image = scene()
    namespace = {"image": image}
    exec(doc_snippet("classify.md", "classify_image", tmp_path / "classifier"), namespace)
    with torch.no_grad():
        expected = model.eval()(clip_normalized(image)).softmax(-1)[0]
    order = expected.argsort(descending=True).tolist()
    assert [name for name, _ in namespace["top5"]] == [classes[k] for k in order]  # 3 classes: all of them
    assert [p for _, p in namespace["top5"]] == pytest.approx(expected[order].tolist(), abs=1e-6)
    again = namespace["classify_image"](namespace["model"], as_uint8_tensor(image), top_k=1)
    assert again == [namespace["top5"][0]]


def test_segmentation_in_a_few_lines_as_documented(tmp_path):
    from flyeva.tasks.segment.model import ModelSection, UperNetSection, build_segmenter
    from flyeva.tasks.segment.run import save_segmenter
    from flyeva.tasks.segment.transforms import normalize

    classes = ["background", "circle", "square"]
    section = ModelSection(
        size="miniature", patch_size=8, decoder="upernet", upernet=UperNetSection(channels=16, aux_channels=8)
    )
    model = build_segmenter(section, len(classes), crop_size=32)
    save_segmenter(model, tmp_path / "segmenter", classes, source={})
    image = scene(seed=1)
    namespace = {"image": image}
    exec(doc_snippet("segment.md", "segment_image", tmp_path / "segmenter"), namespace)
    with torch.no_grad():  # a 32 px image at a 32 px crop is one window: the plain forward pass
        expected = model.eval()(normalize(image)[None]).argmax(1)[0]
    labels = namespace["labels"]
    assert labels.shape == (32, 32) and torch.equal(labels, expected)
    assert namespace["names"] == classes
    assert torch.equal(namespace["segment_image"](namespace["model"], as_uint8_tensor(image)), expected)


def test_eva_clip_in_a_few_lines_as_documented(tmp_path):
    from flyeva.tasks.clip.model import ClipModelSection, TextSection, VisionSection, build_clip, save_clip
    from flyeva.tasks.clip.zeroshot import build_classifier

    cfg = ClipModelSection(
        embed_dim=16,
        vision=VisionSection(size="miniature"),
        text=TextSection(width=32, heads=2, layers=1, context_length=16, quick_gelu=False),
    )
    torch.manual_seed(0)
    model = build_clip(cfg, release_init=False)
    save_clip(model, cfg, tmp_path / "clip")
    image = scene(seed=2)
    namespace = {"image": image}
    exec(doc_snippet("clip.md", "embed_texts", tmp_path / "clip"), namespace)
    model.eval()
    with torch.no_grad():
        image_features = model.encode_image(clip_normalized(image), normalize=True)
        tokens = open_clip.tokenize(["a red circle", "a blue square"], context_length=16)
        text_features = model.encode_text(tokens, normalize=True)
        classifier = build_classifier(model, ["circle", "square"], ["a photo of a {}."])
        probabilities = (model.logit_scale.exp() * image_features @ classifier).softmax(-1)[0]
    torch.testing.assert_close(namespace["images"], image_features, atol=1e-6, rtol=0)
    torch.testing.assert_close(namespace["texts"], text_features, atol=1e-6, rtol=0)
    assert namespace["similarity"].shape == (1, 2)
    ranked = namespace["ranked"]
    best = int(probabilities.argmax())
    assert ranked[0] == (["circle", "square"][best], pytest.approx(float(probabilities[best]), abs=1e-6))
    assert sum(p for _, p in ranked) == pytest.approx(1.0, abs=1e-6)


def test_label_png_is_paletted_with_the_fixed_colours(tmp_path):
    labels = np.array([[0, 1, 2], [5, 255, 1]], dtype=np.uint8)
    paletted(labels).save(tmp_path / "x_labels.png")
    stored = Image.open(tmp_path / "x_labels.png")
    colours = np.array(stored.getpalette()[: 3 * 256]).reshape(256, 3)
    assert stored.mode == "P" and np.array_equal(np.array(stored), labels)
    # PASCAL VOC's colour map, by hand: index bits 0/1/2 -> the top bit of R/G/B, and so on
    assert colours[:6].tolist() == [
        [0, 0, 0],
        [128, 0, 0],
        [0, 128, 0],
        [128, 128, 0],
        [0, 0, 128],
        [128, 0, 128],
    ]
    assert colours[255].tolist() == [224, 224, 192] and len({tuple(c) for c in colours.tolist()}) == 256


def test_segmentation_picture_side_by_side_scaled_up_with_a_legend():
    image = Image.new("RGB", (64, 48), (100, 100, 100))
    prediction = np.zeros((48, 64), np.uint8)
    prediction[:, 32:] = 1
    truth = np.full((48, 64), 2, np.uint8)
    drawn = np.array(picture(image, prediction, ["background", "circle", "square", "star"], truth))
    factor = 8  # ceil(512 / 64)
    assert drawn.shape[1] == 2 * 64 * factor and drawn.shape[0] > 48 * factor
    # right half of the prediction panel: 50/50 of grey 100 and circle's (128, 0, 0); truth: square's
    assert drawn[300, 400].tolist() == [114, 50, 50] and drawn[300, 64 * factor + 300].tolist() == [
        50,
        114,
        50,
    ]
    legend = drawn[48 * factor :].reshape(-1, 3)
    shown = {tuple(PALETTE[k].tolist()) for k in (1, 2)} & {tuple(c) for c in legend.tolist()}
    assert len(shown) == 2 and tuple(PALETTE[3].tolist()) not in {tuple(c) for c in legend.tolist()}
    alone = np.array(picture(image, prediction, ["background", "circle", "square", "star"]))
    assert alone.shape[1] == 64 * factor  # no label: the prediction alone


def test_detection_drawing_is_scaled_up_with_a_tag_per_box():
    from flyeva.tasks.detect.predict import colour, draw, upscale_factor

    image = torch.full((3, 30, 40), 90, dtype=torch.uint8)
    detection = {
        "boxes": torch.tensor([[5.0, 10.0, 20.0, 25.0], [1.0, 1.0, 3.0, 3.0]]),
        "labels": torch.tensor([1, 0]),
        "scores": torch.tensor([0.9, 0.2]),
    }
    drawn = np.array(draw(image, detection, ["circle", "square"], threshold=0.5))
    factor = upscale_factor(30, 40)
    assert factor == math.ceil(512 / 40) == 13 and drawn.shape == (30 * 13, 40 * 13, 3)
    assert drawn[200, 65].tolist() == list(colour(1))  # the kept box's left edge, x = 5 x 13
    assert drawn[200, 100].tolist() == [90, 90, 90]  # inside it: the image (no mask given)
    assert tuple(colour(0)) not in {tuple(c) for c in drawn.reshape(-1, 3).tolist()}  # score 0.2: not drawn
    tag = drawn[100:131, 60:260].reshape(-1, 3)  # above the box: 'square 0.90' in white on its colour
    assert (tag == 255).all(axis=1).sum() > 20 and (tag == colour(1)).all(axis=1).sum() > 100
    nothing = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.long),
        "scores": torch.zeros(0),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchvision's "boxes doesn't contain any box" must not leak
        empty = np.array(draw(image, nothing, ["circle", "square"], threshold=0.5))
    assert empty.shape == (390, 520, 3) and (empty == 90).all()
