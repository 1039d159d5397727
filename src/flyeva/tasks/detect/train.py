"""`flyeva detect train|eval|predict`: the detector on the shared engine, COCO/LVIS evaluation, drawings."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flyeva.config import ConfigError, write_config
from flyeva.engine import distributed as D
from flyeva.engine.loop import PRECISIONS, StepContext, train
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.recipe import DetectConfig, validate

logger = logging.getLogger(__name__)


class DetectionObjective:
    """The sum of RPN, cascade-stage and mask losses; each term is logged."""

    def __call__(
        self, model: nn.Module, batch: dict[str, Any], ctx: StepContext
    ) -> tuple[torch.Tensor, dict]:
        targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in batch["targets"]]
        if not targets:  # every image of the batch was unreadable: a zero that reaches every weight
            return sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0, {}
        losses = model(batch["images"], targets, batch["image_sizes"].tolist())
        total = sum(losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}


def prepare_data(cfg: DetectConfig, out: Path, need_train: bool = True) -> tuple[Path, Path | None, str, str]:
    """(train json, val json or None, train image root, val image root); ShapeWorld is exported if asked.

    The ShapeWorld validation images follow the training ones (indices from data.shapeworld_train).
    """
    d = cfg.data
    if d.train_json:
        return Path(d.train_json), Path(d.val_json) if d.val_json else None, d.train_images, d.val_images
    from flyeva.data.export import export_split
    from flyeva.data.synthetic import ShapeWorld

    world = ShapeWorld(image_size=d.shapeworld_size, seed=d.shapeworld_seed)
    root = out / "shapeworld"
    train_json, val_json = (
        root / "train" / "coco" / "instances.json",
        root / "val" / "coco" / "instances.json",
    )
    if D.is_main():  # deterministic: an existing export is the same images
        if need_train and not train_json.is_file():
            export_split(world, root / "train", d.shapeworld_train, formats=("coco",))
        if d.shapeworld_val and not val_json.is_file():
            export_split(
                world, root / "val", d.shapeworld_val, formats=("coco",), start_index=d.shapeworld_train
            )
    D.barrier()
    return train_json, val_json if d.shapeworld_val else None, "", ""


class DetectionEvaluator:
    """COCO (or LVIS) box and mask AP of the model on a validation set; rank 0 gets the numbers."""

    def __init__(self, dataset: CocoDetectionDataset, json_path: Path, cfg: DetectConfig):
        self.dataset, self.json_path, self.cfg = dataset, json_path, cfg
        self.last_results: list[dict] = []
        self.last_stats: dict[str, dict[str, float]] = {}
        self.last_step = -1  # the optimizer step of the last evaluation

    def evaluate(self, model: nn.Module) -> dict[str, dict[str, float]]:
        from flyeva.tasks.detect.evaluate import coco_evaluate, gather_results, predict_dataset

        t = self.cfg.test
        base = D.unwrap(model)
        square = base.square_size
        base.square_size = t.size  # test images are padded to the test size, not the training crop
        try:
            results, skipped = predict_dataset(
                model, self.dataset, t.size, t.batch_size, t.max_images, PRECISIONS[self.cfg.train.precision]
            )
        finally:
            base.square_size = square
        results = gather_results(results)
        if not D.is_main():
            return {}
        stats = coco_evaluate(self.json_path, results, lvis=t.lvis, max_per_image=t.detections_per_image)
        for cap in t.extra_caps:
            extra = coco_evaluate(self.json_path, results, lvis=t.lvis, max_per_image=cap)
            stats.update({f"{kind}@{cap}": values for kind, values in extra.items()})
        self.last_results, self.last_stats = results, stats
        if skipped:
            logger.warning("%d unreadable validation images skipped", skipped)
        return stats

    def __call__(self, model: nn.Module, ctx: StepContext) -> dict[str, float]:
        stats = self.evaluate(model)
        self.last_step = ctx.step
        return {f"{kind}_{name}": value for kind, values in stats.items() for name, value in values.items()}

    def write(self, out: Path) -> dict[str, Any]:
        """OUTPUT/eval.json (stats by name) and OUTPUT/detections.json (COCO results)."""
        document = dict(self.last_stats, detections_per_image=self.cfg.test.detections_per_image)
        (out / "eval.json").write_text(json.dumps(document, indent=2) + "\n")
        (out / "detections.json").write_text(json.dumps(self.last_results))
        return document


def _fed_weights(cfg: DetectConfig, dataset: CocoDetectionDataset) -> torch.Tensor | None:
    from flyeva.tasks.detect.lvis import fed_loss_weights

    return fed_loss_weights(dataset.image_counts) if cfg.model.classifier == "sigmoid_fed" else None


def run_train(cfg: DetectConfig) -> dict[str, Any]:
    """Train on the shared engine; write final/ (weights, kind `detector`), eval.json, detections.json."""
    from flyeva.engine.checkpoint import full_model_state
    from flyeva.models.weights import save_weights
    from flyeva.tasks.detect.build import build_detector, release_param_groups
    from flyeva.tasks.detect.lvis import repeat_factors
    from flyeva.tasks.detect.stream import DetectionBatchStream
    from flyeva.tasks.detect.transforms import LargeScaleJitter

    validate(cfg)
    D.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_json, val_json, train_root, val_root = prepare_data(cfg, out)
    dataset = CocoDetectionDataset(train_json, train_root or None)
    val = CocoDetectionDataset(val_json, val_root or None) if val_json else None
    factors = None
    if cfg.data.repeat_threshold > 0:
        factors = repeat_factors(dataset.image_categories(), cfg.data.repeat_threshold)
    torch.manual_seed(cfg.train.seed)  # the same fresh weights on every rank and in every run
    model = build_detector(cfg, dataset.num_classes, _fed_weights(cfg, dataset))
    d = cfg.data
    transform = LargeScaleJitter(cfg.model.img_size, d.lsj_min_scale, d.lsj_max_scale, d.flip)
    stream = DetectionBatchStream(
        dataset, transform, cfg.train.batch_size, D.rank(), D.world_size(), cfg.train.seed, factors
    )
    evaluator = DetectionEvaluator(val, val_json, cfg) if val is not None else None
    if D.is_main():
        write_config(cfg, out)
    result = train(
        model,
        DetectionObjective(),
        stream,
        cfg.train,
        cfg.optim,
        groups_fn=lambda m: release_param_groups(m, cfg.optim, cfg.model.weight_decay_all),
        evaluate=evaluator if cfg.test.during_training else None,
    )
    state = full_model_state(result.model)
    summary: dict[str, Any] = {"steps": result.step, "skipped_images": result.skipped_images}
    if D.is_main():
        extra = {"classes": dataset.class_names, "category_ids": dataset.category_ids}
        save_weights(state, out / "final", kind="detector", arch=D.unwrap(result.model).arch, extra=extra)
    if evaluator is not None:
        if evaluator.last_step != result.step:  # the engine evaluates only at the end of an epoch
            evaluator.evaluate(result.model)
        if D.is_main():
            summary["eval"] = evaluator.write(out)
    return summary


def _load_detector(cfg: DetectConfig) -> tuple[nn.Module, dict[str, Any]]:
    from flyeva.models.weights import read_config
    from flyeva.tasks.detect.build import build_detector

    if not cfg.model.init:
        raise ConfigError(
            "model.init is empty; give the detector folder (OUTPUT/final of `flyeva detect train`)"
        )
    path = Path(cfg.model.init)
    if not path.exists():
        raise FileNotFoundError(f"model.init={path} does not exist; give a detector weights folder")
    config = read_config(path) if path.is_dir() else {}
    if config and config["kind"] != "detector":
        raise ConfigError(
            f"{path} holds a {config['kind']!r}, not a detector; give OUTPUT/final of a detect run"
        )
    num_classes = config.get("arch", {}).get("roi_heads", {}).get("num_classes", 80)
    return build_detector(cfg, num_classes).eval(), config


def run_eval(cfg: DetectConfig) -> dict[str, Any]:
    """Evaluate `model.init` (a detector) on the validation set; write OUTPUT/eval.json and detections."""
    D.init_distributed(cfg.train.device)
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.data.val_json and cfg.data.shapeworld_val <= 0:
        raise ConfigError("data.val_json is empty; set it (COCO-format json) or data.shapeworld_val=N")
    model, _ = _load_detector(cfg)
    _, val_json, _, val_root = prepare_data(cfg, out, need_train=False)
    val = CocoDetectionDataset(val_json, val_root or None)
    model.to(D.init_distributed(cfg.train.device))
    evaluator = DetectionEvaluator(val, val_json, cfg)
    evaluator.evaluate(model)
    return evaluator.write(out) if D.is_main() else {}
