"""`flyeva detect train|eval|predict`: the detector on the shared engine, COCO/LVIS evaluation, drawings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from flyeva.config import ConfigError
from flyeva.engine import distributed as D
from flyeva.engine.loop import StepContext
from flyeva.engine.run import RunLock
from flyeva.engine.stage import EVAL_FILE, Built, result_record, write_result
from flyeva.tasks.detect.annotations import check_usable
from flyeva.tasks.detect.config import DetectConfig, validate
from flyeva.tasks.detect.data import CocoDetectionDataset
from flyeva.tasks.detect.evaluate import DetectionEvaluator
from flyeva.tasks.detect.objective import DetectionObjective


def prepare_data(cfg: DetectConfig, out: Path, need_train: bool = True) -> tuple[Path, Path | None, str, str]:
    """(train json, val json or None, train image root, val image root); ShapeWorld is exported where a
    split's json is not given. The ShapeWorld validation images follow the training ones."""
    d = cfg.data
    root = out / "shapeworld"
    train_json = Path(d.train_json) if d.train_json else root / "train" / "coco" / "instances.json"
    val_json = Path(d.val_json) if d.val_json else root / "val" / "coco" / "instances.json"
    export_train = need_train and not d.train_json and not train_json.is_file()
    export_val = not d.val_json and d.shapeworld_val > 0 and not val_json.is_file()
    if (export_train or export_val) and D.is_main():  # deterministic: an existing export is the same images
        from flyeva.data.export import export_split
        from flyeva.data.synthetic import ShapeWorld

        world = ShapeWorld(image_size=d.shapeworld_size, seed=d.shapeworld_seed)
        if export_train:
            export_split(world, root / "train", d.shapeworld_train, formats=("coco",))
        if export_val:
            export_split(
                world, root / "val", d.shapeworld_val, formats=("coco",), start_index=d.shapeworld_train
            )
    D.barrier()
    has_val = bool(d.val_json) or d.shapeworld_val > 0
    return train_json, val_json if has_val else None, d.train_images, d.val_images


def build_train(cfg: DetectConfig) -> Built:
    """The detector, its loss and its data on the shared engine; final/ holds a `detector` folder."""
    from flyeva.models.weights import save_weights
    from flyeva.tasks.detect.build import build_detector, release_param_groups
    from flyeva.tasks.detect.lvis import fed_loss_weights, repeat_factors
    from flyeva.tasks.detect.stream import DetectionBatchStream
    from flyeva.tasks.detect.transforms import LargeScaleJitter

    out = Path(cfg.train.output_dir)
    train_json, val_json, train_root, val_root = prepare_data(cfg, out)
    masks = cfg.model.mask_head and bool(cfg.model.mask_dims)  # false: boxes only (Objects365)
    dataset = CocoDetectionDataset(train_json, train_root or None, masks=masks)
    check_usable(dataset)  # no usable sample, or most of them dropped: one line, before any training
    val = CocoDetectionDataset(val_json, val_root or None, masks=masks) if val_json else None
    d = cfg.data
    factors = (
        repeat_factors(dataset.image_categories(), d.repeat_threshold) if d.repeat_threshold > 0 else None
    )
    fed_weights = fed_loss_weights(dataset.image_counts) if cfg.model.classifier == "sigmoid_fed" else None
    torch.manual_seed(cfg.train.seed)  # the same fresh weights on every rank and in every run
    model = build_detector(cfg, dataset.num_classes, fed_weights)
    transform = LargeScaleJitter(cfg.model.img_size, d.lsj_min_scale, d.lsj_max_scale, d.flip)
    stream = DetectionBatchStream(
        dataset, transform, cfg.train.batch_size, D.rank(), D.world_size(), cfg.train.seed, factors
    )
    arch = model.arch
    extra = {"classes": dataset.class_names, "category_ids": dataset.category_ids}
    return Built(
        model=model,
        objective=DetectionObjective(),
        stream=stream,
        save_final=lambda state, folder: save_weights(state, folder, kind="detector", arch=arch, extra=extra),
        evaluator=DetectionEvaluator(val, val_json, cfg) if val is not None else None,
        groups_fn=lambda m: release_param_groups(m, cfg.optim, cfg.model.weight_decay_all),
        facts={"num_classes": dataset.num_classes, "train_images": len(dataset)},
    )


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
    # the label set and the backbone geometry are the file's; nothing may start fresh
    return build_detector(cfg, None, training=False).eval(), config


def run_eval(cfg: DetectConfig) -> dict[str, Any]:
    """Evaluate `model.init` (a detector) on the validation set; write OUTPUT/eval.json and detections."""
    validate(cfg, need_train=False)
    device = D.init_distributed(cfg.train.device)
    if not cfg.data.val_json and cfg.data.shapeworld_val <= 0:
        raise ConfigError("data.val_json is empty; set it (COCO-format json) or data.shapeworld_val=N")
    out = Path(cfg.train.output_dir)
    with RunLock.hold(out, enabled=D.is_main()):  # never write beside a training run of this folder
        model, _ = _load_detector(cfg)
        _, val_json, _, val_root = prepare_data(cfg, out, need_train=False)
        val = CocoDetectionDataset(val_json, val_root or None, masks=model.roi_heads.mask_head is not None)
        evaluator = DetectionEvaluator(val, val_json, cfg)
        metrics = evaluator(model.to(device), StepContext(0, 0, 0, D.rank(), cfg.train.seed, device))
        if not D.is_main():
            return {}
        record = result_record(
            "detect", "eval", evaluations=[metrics], weights=cfg.model.init, details=evaluator.details()
        )
        write_result(out, record, EVAL_FILE)
    return record
