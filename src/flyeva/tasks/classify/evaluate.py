"""`flyeva classify eval`: top-1 / top-5 of a classifier folder (`flyeva classify finetune`'s `final`) or
a release fine-tuned checkpoint (its head decides the number of classes), written to OUTPUT/eval.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.data.sources import SourceConfig
from flyeva.engine import distributed as D
from flyeva.engine.loop import PRECISIONS, StepContext
from flyeva.engine.stage import write_evaluation
from flyeva.eval.classification import Evaluator
from flyeva.models.weights import is_weights_folder
from flyeva.tasks.classify.data import DataSection, build_labeled_source, eval_stream
from flyeva.tasks.classify.model import classifier_from_pretrained, load_classifier, load_pretrained


@dataclass
class EvalModelSection:
    checkpoint: str = ""  # a flyeva classifier folder or a release fine-tuned checkpoint
    num_heads: int = 0  # only for a release checkpoint of a size `flyeva models` does not name
    img_size: int = 0  # 0 = the checkpoint's resolution
    pool: str = "avg"  # release checkpoints: avg (mean patch tokens -> fc_norm) | cls
    final_norm: str = "fc_norm"  # release checkpoints keep their final norm as fc_norm


@dataclass
class EvalRunSection:
    output_dir: str = "runs/classify_eval"
    batch_size: int = 64
    precision: str = "fp32"
    device: str = "auto"
    num_workers: int = 4


@dataclass
class ClassifyEvalConfig:
    model: EvalModelSection = field(default_factory=EvalModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: EvalRunSection = field(default_factory=EvalRunSection)


def load_for_eval(section: EvalModelSection) -> torch.nn.Module:
    """The classifier a checkpoint holds, with its own head."""
    if not section.checkpoint:
        raise ConfigError("nothing to evaluate: pass --weights (a classifier folder or release checkpoint)")
    if is_weights_folder(section.checkpoint):
        model, _ = load_classifier(section.checkpoint)
        return model
    weights = load_pretrained(section.checkpoint, section.num_heads)
    if weights.head_state is None:
        raise ConfigError(
            f"{section.checkpoint} has no classification head; fine-tune it first (flyeva classify finetune)"
        )
    num_classes = weights.head_state["head.weight"].shape[0]
    return classifier_from_pretrained(
        weights, num_classes, pool=section.pool, final_norm=section.final_norm, img_size=section.img_size
    )


def run_classify_eval(cfg: ClassifyEvalConfig) -> dict[str, Any]:
    """Evaluate on the validation split; write OUTPUT/eval.json (rank 0) and return it."""
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {cfg.train.precision!r}")
    device = D.init_distributed(cfg.train.device)
    model = load_for_eval(cfg.model).to(device).eval()
    val_sections = cfg.data.val  # data.root: its val/ folder alone (no train/ needed to evaluate)
    if cfg.data.root:
        val_sections = [SourceConfig(type="folder", path=str(Path(cfg.data.root) / "val"))]
    if not val_sections:
        raise ConfigError("no validation data: set data.root (ImageFolder layout with val/) or data.val")
    val = build_labeled_source(val_sections, "val")
    num_classes = model.num_classes
    classes = getattr(val, "classes", None)
    if classes is not None and len(classes) != num_classes:
        raise ConfigError(
            f"the checkpoint's head has {num_classes} classes but the data has {len(classes)}; "
            "evaluate on the data the head was trained for"
        )
    image_size = model.patch_embed.img_size[0]
    stream = eval_stream(val, image_size, cfg.data.crop_pct, cfg.train.batch_size, D.rank(), D.world_size())
    evaluator = Evaluator(stream, num_classes, cfg.train.precision, cfg.data.max_val_batches, classes)
    metrics = evaluator(model, StepContext(0, 0, 0, D.rank(), 0, device))
    if not D.is_main():
        return {}
    facts = {"num_classes": num_classes}
    out = Path(cfg.train.output_dir)
    return write_evaluation(
        out, "classify", metrics, weights=cfg.model.checkpoint, facts=facts, details=evaluator.details()
    )
