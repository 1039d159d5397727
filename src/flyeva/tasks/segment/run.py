"""`flyeva segment train|eval`: the stage on the shared engine (build) and the evaluation verb."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.engine import distributed as D
from flyeva.engine.loop import StepContext
from flyeva.engine.run import RunLock
from flyeva.engine.stage import Built, write_evaluation
from flyeva.models.weights import load, read_config, save_weights
from flyeva.tasks.segment.config import SegmentConfig, resolve
from flyeva.tasks.segment.data import ensure_shapeworld, open_split
from flyeva.tasks.segment.evaluate import Evaluator
from flyeva.tasks.segment.model import build_from_arch, build_segmenter, segmenter_arch
from flyeva.tasks.segment.objective import SegmentationObjective
from flyeva.tasks.segment.stream import SegmentationBatchStream
from flyeva.tasks.segment.transforms import TrainTransform


def save_segmenter(model: torch.nn.Module, folder: Path, classes: list[str], source: dict[str, Any]) -> Path:
    return save_weights(
        model, folder, kind="segmenter", arch=segmenter_arch(model), source=source, extra={"classes": classes}
    )


def build_segment(cfg: SegmentConfig) -> Built:
    """The segmenter (UperNet or Mask2Former on EVA), its loss and the data on the shared engine."""
    device = D.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    data = ensure_shapeworld(cfg.data, out)
    train_pairs, val_pairs = open_split(data, "train"), open_split(data, "val")
    model = build_segmenter(cfg.model, len(train_pairs.classes), cfg.aug.crop_size, cfg.train.seed)
    arch = segmenter_arch(model)
    if D.world_size() > 1 and device.type == "cuda" and cfg.train.strategy != "fsdp":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg trains with SyncBN (CUDA only)
    rank, world = D.rank(), D.world_size()
    batches = cfg.train.steps_per_epoch * cfg.train.accum_steps
    stream = SegmentationBatchStream(
        train_pairs, TrainTransform(cfg.aug), cfg.train.batch_size, rank, world, cfg.train.seed, batches
    )
    source = {"init": cfg.model.init, "recipe": "segment train"}

    def save_final(state: dict[str, torch.Tensor], folder: Path) -> None:
        final = build_from_arch(arch)
        final.load_state_dict(state)
        save_segmenter(final, folder, train_pairs.classes, source)

    return Built(
        model,
        SegmentationObjective(),
        stream,
        save_final,
        evaluator=Evaluator(val_pairs, cfg.eval, rank, world, shard=cfg.train.strategy != "fsdp"),
        facts={"num_classes": len(train_pairs.classes), "train_pairs": len(train_pairs)},
    )


def load_segmenter(path: str) -> torch.nn.Module:
    """A trained segmenter from its weights folder, with `classes` from its config."""
    if not path:
        raise ConfigError("set weights=PATH to a segmenter folder (OUTPUT/final of `flyeva segment train`)")
    if not Path(path).exists():
        raise FileNotFoundError(f"weights folder {path} does not exist")
    kind = read_config(path)["kind"]
    if kind != "segmenter":
        raise ConfigError(f"{path} holds a {kind!r} model; segment eval/predict need a segmenter folder")
    return load(path)


def run_eval(cfg: SegmentConfig) -> dict[str, Any]:
    """Evaluate `cfg.weights` on the validation split; write OUTPUT/eval.json."""
    cfg = resolve(cfg)
    device = D.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    with RunLock.hold(out, enabled=D.is_main()):  # never write beside a training run of this folder
        model = load_segmenter(cfg.weights).to(device)
        data = ensure_shapeworld(cfg.data, out)
        val_pairs = open_split(data, "val")
        if model.num_classes != len(val_pairs.classes):
            raise ConfigError(
                f"{cfg.weights} predicts {model.num_classes} classes but the data has "
                f"{len(val_pairs.classes)}; evaluate on the dataset it was trained for"
            )
        evaluator = Evaluator(val_pairs, cfg.eval, D.rank(), D.world_size())
        metrics = evaluator(model, StepContext(0, 0, 0, D.rank(), cfg.train.seed, device))
        if not D.is_main():
            return {}
        return write_evaluation(out, "segment", metrics, weights=cfg.weights, details=evaluator.details())
