"""`flyeva clip zeroshot`: zero-shot classification and image-text retrieval (docs/recipes.md section 5).

Classifier: open_clip's `build_zero_shot_classifier` over OpenAI's 80 ImageNet templates by default.
Reported: top-1/top-5 per dataset, the average top-1 and the robustness gap = average top-1 of the
distribution-shift sets (ImageNet-V2/-A/-R/-Sketch, ObjectNet) minus ImageNet-1K's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from PIL import Image

from flyeva.data.sources import SOURCE_KEYS, SourceConfig, SourceSubset, read_lines
from flyeva.data.transforms import CLIP_MEAN, CLIP_STD, EvalTransform
from flyeva.tasks.clip.datasets import EvalSet, caption_groups, eval_batches, eval_set

ROLES = ("in1k", "shift", "other")
# Default roles by dataset name: docs/recipes.md section 5 lists these as ImageNet and its shifted variants.
DEFAULT_ROLES = {
    **dict.fromkeys(("imagenet", "imagenet_1k", "in1k"), "in1k"),
    **dict.fromkeys(("imagenet_v2", "imagenet_a", "imagenet_r", "imagenet_sketch", "objectnet"), "shift"),
}
# Video sets (docs/video.md), scored by flyeva.tasks.clip.video_zeroshot: type -> video list type.
VIDEO_TYPES = {"video_list": "list", "kinetics": "kinetics", "video_folder": "folder"}


@dataclass
class EvalDatasetSection(SourceConfig):
    """A zero-shot classification set: a labelled data source (docs/data.md) or a video list (VIDEO_TYPES)."""

    name: str = ""
    classnames: str = ""  # file of class names in class order ("" = the folder / meta names)
    templates: list[str] = field(default_factory=list)  # prompts with {} ([] = zeroshot's)
    templates_file: str = ""  # or a file of them, one per line
    role: str = ""  # in1k | shift | other ("" = from the name, e.g. imagenet_a -> shift)
    split: str = "test"  # cifar10 / cifar100: test | train
    num_samples: int = 500  # shapeworld
    seed: int = 1000  # shapeworld: a seed the training data does not use
    image_size: int = 64  # shapeworld
    num_frames: int = 8  # video: frames sampled per clip (their embeddings are averaged)
    views: int = 1  # video: temporal views per clip, averaged


@dataclass
class RetrievalSection(SourceConfig):
    """A captioned set for image<->text recall@k (docs/data.md): a caption table or caption folder."""

    type: str = ""  # captions | caption_folder ("" = caption_folder for a folder, captions for a file)
    name: str = ""


@dataclass
class ZeroShotSection:
    checkpoint: str = ""  # flyeva CLIP folder, EVA-CLIP release or open_clip EVA01 file ("" = recipe model)
    datasets: list[EvalDatasetSection] = field(default_factory=list)
    retrieval: list[RetrievalSection] = field(default_factory=list)
    # Prompts with {} for the class name; none = OpenAI's 80 ImageNet templates (docs/recipes.md section 5).
    templates: list[str] = field(default_factory=list)
    templates_file: str = ""  # or a file of them, one per line
    crop_pct: float = 1.0
    batch_size: int = 256
    num_workers: int = 4
    max_images: int = 0  # per dataset, 0 = all (a quick look at a large set)
    during_training: bool = False  # also evaluate the classification sets at every epoch end
    output: str = ""  # JSON path; `flyeva clip zeroshot` sets OUTPUT/zeroshot.json (docs/architecture.md)
    device: str = "auto"


def default_templates() -> list[Callable[[str], str]]:
    """OpenAI's 80 ImageNet prompt templates (docs/recipes.md section 5), as open_clip ships them."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def check_templates(templates: Sequence[str], where: str) -> list[str]:
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{where}: every template needs exactly one {{}} for the class name; bad: {bad[:3]}")
    return list(templates)


def choose_templates(
    inline: Sequence[str], file: str, fallback: list | None = None
) -> list[str | Callable[[str], str]]:
    """Inline templates, else a file of them (one per line), else `fallback` or OpenAI's 80."""
    if inline:
        return check_templates(inline, "templates")
    if file:
        return check_templates(read_lines(file, "template"), file)
    return fallback if fallback is not None else default_templates()


def tokenizer_for(context_length: int) -> Callable[[Sequence[str]], torch.Tensor]:
    """open_clip's BPE tokenizer (vocabulary bundled in the package) at `context_length`."""
    import open_clip

    return partial(open_clip.tokenize, context_length=context_length)


@torch.no_grad()
def build_classifier(
    model: torch.nn.Module,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    device: torch.device | str = "cpu",
    classes_per_batch: int = 10,
) -> torch.Tensor:
    """[embed_dim, num_classes] zero-shot weights: per class, the renormalised mean of its prompts'
    normalised text embeddings."""
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    return build_zero_shot_classifier(
        model,
        tokenizer_for(model.context_length),
        list(classnames),
        list(templates),
        num_classes_per_batch=classes_per_batch,
        device=device,
    )


def _pixels(model: torch.nn.Module, images: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
    """The suite's preprocessing: short side to the tower's size, centre crop, CLIP mean/std."""
    transform = EvalTransform(model.visual.patch_embed.img_size[0], 1.0, CLIP_MEAN, CLIP_STD)
    pil = [
        i.convert("RGB") if isinstance(i, Image.Image) else Image.fromarray(i.permute(1, 2, 0).cpu().numpy())
        for i in images
    ]
    return torch.stack([transform(image) for image in pil]).to(next(model.parameters()).device)


@torch.no_grad()
def embed_images(model: torch.nn.Module, images: Sequence[Image.Image | torch.Tensor]) -> torch.Tensor:
    """[N, embed_dim] L2-normalised embeddings of PIL images or uint8 [3, H, W] RGB tensors."""
    return model.eval().encode_image(_pixels(model, images), normalize=True).float()


@torch.no_grad()
def embed_texts(model: torch.nn.Module, texts: Sequence[str]) -> torch.Tensor:
    """[N, embed_dim] L2-normalised embeddings of texts (open_clip's tokenizer at the model's context)."""
    tokens = tokenizer_for(model.context_length)(list(texts)).to(next(model.parameters()).device)
    return model.eval().encode_text(tokens, normalize=True).float()


@torch.no_grad()
def classify_image(
    model: torch.nn.Module,
    image: Image.Image | torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]] | None = None,
) -> list[tuple[str, float]]:
    """Zero-shot (class name, probability) pairs of one image, best first: the suite's classifier
    (OpenAI's 80 templates unless given) and softmax of the logits scaled by exp(logit_scale)."""
    device = next(model.parameters()).device
    classifier = build_classifier(model.eval(), classnames, templates or default_templates(), device).float()
    logits = model.logit_scale.exp().float() * embed_images(model, [image]) @ classifier
    ranked = sorted(zip(classnames, logits.softmax(-1)[0].tolist()), key=lambda pair: -pair[1])
    return [(name, float(p)) for name, p in ranked]


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the k highest logits, per k (k capped at the class count)."""
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate_classification(
    model: torch.nn.Module,
    dataset: EvalSet,
    classifier: torch.Tensor,
    transform: Callable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    max_images: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Top-1/top-5 (%) of `model` on `dataset`, with the logits restricted to `dataset.subset`."""
    weights = classifier[:, dataset.subset] if dataset.subset is not None else classifier
    total = len(dataset.labels)
    count = min(total, max_images) if max_images else total
    keep = [index * total // count for index in range(count)]  # evenly spread: folders are class-sorted
    images = SourceSubset(dataset.source, keep, [dataset.labels[i] for i in keep])
    correct, seen, skipped = Counter(), 0, 0
    for batch in eval_batches(images, transform, batch_size, num_workers):
        skipped += batch["num_skipped"]
        if len(batch["labels"]) == 0:
            continue
        features = model.encode_image(batch["images"].to(device), normalize=True)
        correct.update(topk_correct(features.float() @ weights.float(), batch["labels"].to(device)))
        seen += len(batch["labels"])
    if seen == 0:
        raise ValueError(f"dataset {dataset.name!r}: no readable images")
    accuracy = {f"top{k}": 100.0 * hits / seen for k, hits in correct.items()}
    return {**accuracy, "images": seen, "skipped": skipped, "classes": weights.shape[1]}


def role_of(section: EvalDatasetSection) -> str:
    role = section.role or DEFAULT_ROLES.get(section.name.lower(), "other")
    if role not in ROLES:
        raise ValueError(f"dataset {section.name!r}: role must be one of {ROLES}, got {role!r}")
    return role


def summarize(top1: dict[str, float], roles: dict[str, str]) -> dict[str, float]:
    """Average top-1 over all sets; with IN-1K and shift sets, the shift average and the robustness gap
    (shift average minus IN-1K; docs/recipes.md section 5)."""
    summary = {"average_top1": sum(top1.values()) / len(top1)} if top1 else {}
    reference = [top1[name] for name in top1 if roles[name] == "in1k"]
    shifts = [top1[name] for name in top1 if roles[name] == "shift"]
    if len(reference) > 1:
        raise ValueError(f"more than one dataset has role in1k: {[n for n in top1 if roles[n] == 'in1k']}")
    if shifts:
        summary["shift_average_top1"] = sum(shifts) / len(shifts)
        if reference:
            summary["robustness_gap"] = summary["shift_average_top1"] - reference[0]
    return summary


def retrieval_recall(
    similarity: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k (%) both ways from an [images, texts] similarity; `text_to_image[t]` = the image of text t.
    An image's rank is that of its best caption; a rank counts the candidates scoring strictly higher."""
    num_images = similarity.shape[0]
    owns = text_to_image[None, :] == torch.arange(num_images, device=similarity.device)[:, None]
    best_true_text = similarity.masked_fill(~owns, float("-inf")).max(dim=1).values
    image_rank = (similarity > best_true_text[:, None]).sum(dim=1)
    true_image = similarity.gather(0, text_to_image[None, :]).squeeze(0)
    text_rank = (similarity > true_image[None, :]).sum(dim=0)
    recall = {}
    for k in ks:
        recall[f"image_to_text_R@{k}"] = 100.0 * float((image_rank < k).float().mean())
        recall[f"text_to_image_R@{k}"] = 100.0 * float((text_rank < k).float().mean())
    return recall


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module,
    section: RetrievalSection,
    transform: Callable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    source, images, captions, owners = caption_groups(section)
    tokenize = tokenizer_for(model.context_length)
    image_features, readable = [], []
    indexed = SourceSubset(source, images, list(range(len(images))))  # target: the image's position
    for batch in eval_batches(indexed, transform, batch_size, num_workers):
        if len(batch["labels"]):
            image_features.append(model.encode_image(batch["images"].to(device), normalize=True).float())
            readable += batch["labels"].tolist()
    if not readable:
        raise ValueError(f"retrieval set {section.path}: no readable images")
    # An unreadable image drops out together with its captions.
    position = {image: row for row, image in enumerate(readable)}
    texts = [(caption, position[owner]) for caption, owner in zip(captions, owners) if owner in position]
    batches = [
        [c for c, _ in texts[start : start + batch_size]] for start in range(0, len(texts), batch_size)
    ]
    text_features = [model.encode_text(tokenize(batch).to(device), normalize=True) for batch in batches]
    similarity = torch.cat(image_features) @ torch.cat(text_features).float().T
    text_image = torch.tensor([owner for _, owner in texts], device=similarity.device)
    return {**retrieval_recall(similarity, text_image), "images": len(readable), "captions": len(texts)}


def load_eval_set(section: EvalDatasetSection) -> Any:
    """An `EvalSet` of images, or for a video type a `VideoList`."""
    if section.type in VIDEO_TYPES:
        if not section.path:
            raise ValueError(f"dataset {section.name!r} ({section.type}) needs a path")
        from flyeva.data.video.datasets import load_video_list  # lazy: video needs PyAV

        return load_video_list(VIDEO_TYPES[section.type], section.path, section.root, section.classnames)
    if section.type not in SOURCE_KEYS:
        kinds = sorted(SOURCE_KEYS) + list(VIDEO_TYPES)
        raise ValueError(f"dataset {section.name!r}: unknown type {section.type!r}; use one of {kinds}")
    return eval_set(section, section.name, section.classnames, role_of(section))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ZeroShotSuite:
    """The datasets of a `ZeroShotSection`, loaded once; `run(model)` evaluates a model on all of them."""

    def __init__(self, cfg: ZeroShotSection, image_size: int):
        for index, section in enumerate(cfg.datasets):
            section.name = section.name or f"{section.type}_{index}"
        names = [section.name for section in cfg.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"zero-shot dataset names must be unique, got {names}")
        self.cfg = cfg
        self.sets = [load_eval_set(section) for section in cfg.datasets]
        suite_templates = choose_templates(cfg.templates, cfg.templates_file)
        self.templates = {
            section.name: choose_templates(
                section.templates, section.templates_file, self._fallback(section, suite_templates)
            )
            for section in cfg.datasets
        }
        self.image_size = image_size
        self.transform = EvalTransform(image_size, cfg.crop_pct, CLIP_MEAN, CLIP_STD)

    def _fallback(self, section: EvalDatasetSection, suite_templates: list) -> list:
        """Video sets default to the Kinetics prompts unless the suite names its own."""
        if section.type not in VIDEO_TYPES or self.cfg.templates or self.cfg.templates_file:
            return suite_templates
        from flyeva.tasks.clip.video_zeroshot import VIDEO_TEMPLATES

        return list(VIDEO_TEMPLATES)

    @torch.no_grad()
    def run(self, model: torch.nn.Module, device: torch.device, retrieval: bool = True) -> dict[str, Any]:
        cfg = self.cfg
        was_training = model.training
        model.eval()
        classifiers: dict[tuple, torch.Tensor] = {}
        results: dict[str, Any] = {"datasets": {}, "retrieval": {}}
        loading = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": device}
        for section, dataset in zip(cfg.datasets, self.sets):
            templates = self.templates[section.name]
            if section.type in VIDEO_TYPES:
                from flyeva.tasks.clip.video_zeroshot import evaluate_video_zeroshot

                scores = evaluate_video_zeroshot(
                    model, dataset, templates, image_size=self.image_size, num_frames=section.num_frames,
                    views=section.views, batch_size=cfg.batch_size, device=device,
                )  # fmt: skip
                results["datasets"][section.name] = {"role": role_of(section), **scores}
                continue
            key = (tuple(dataset.classnames), tuple(templates))
            if key not in classifiers:  # ImageNet and its variants share one 1000-class classifier
                classifiers[key] = build_classifier(model, dataset.classnames, templates, device)
            scores = evaluate_classification(
                model, dataset, classifiers[key], self.transform, max_images=cfg.max_images, **loading
            )
            results["datasets"][dataset.name] = {"role": dataset.role, **scores}
        top1 = {name: scores["top1"] for name, scores in results["datasets"].items()}
        results.update(summarize(top1, {name: s["role"] for name, s in results["datasets"].items()}))
        for index, section in enumerate(cfg.retrieval if retrieval else []):
            name = section.name or f"retrieval_{index}"
            results["retrieval"][name] = evaluate_retrieval(model, section, self.transform, **loading)
        model.train(was_training)
        return results


def format_table(results: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    lines = [f"{'dataset':<20} {'role':<6} {'classes':>7} {'images':>8} {'top-1':>7} {'top-5':>7}"]
    for name, scores in results["datasets"].items():
        count = scores.get("images", scores.get("videos"))  # video sets count clips
        lines.append(
            f"{name:<20} {scores['role']:<6} {scores['classes']:>7} {count:>8} "
            f"{scores['top1']:>7.2f} {scores['top5']:>7.2f}"
        )
    if "average_top1" in results:
        lines.append(f"{'average top-1':<44} {results['average_top1']:>7.2f}")
    if "shift_average_top1" in results:
        lines.append(f"{'distribution-shift average top-1':<44} {results['shift_average_top1']:>7.2f}")
    if "robustness_gap" in results:
        lines.append(f"{'robustness gap (shift avg - IN-1K)':<44} {results['robustness_gap']:>+7.2f}")
    for name, recall in results.get("retrieval", {}).items():
        lines.append(f"retrieval {name}: {recall['images']} images, {recall['captions']} captions")
        for direction in ("image_to_text", "text_to_image"):
            values = "  ".join(f"R@{k} {recall[f'{direction}_R@{k}']:6.2f}" for k in (1, 5, 10))
            lines.append(f"  {direction.replace('_', ' '):<14} {values}")
    return "\n".join(lines)
