"""`flyeva video train|eval`: the stage on the shared engine (build) and the multi-view evaluation verb."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flyeva.data.video.datasets import VideoList, load_video_list, write_shapeworld_clips
from flyeva.data.video.decode import get_decoder
from flyeva.data.video.stream import ClipBatchStream, VideoSource, eval_clip_stream
from flyeva.data.video.transforms import ClipEvalTransform, ClipTrainTransform
from flyeva.engine import distributed as D
from flyeva.engine.loop import StepContext
from flyeva.engine.run import RunLock
from flyeva.engine.stage import Built, write_evaluation
from flyeva.models.weights import save_weights
from flyeva.tasks.video.build import build_model
from flyeva.tasks.video.config import SplitSection, VideoConfig, check_config
from flyeva.tasks.video.evaluate import VideoEvaluator
from flyeva.tasks.video.model import VideoEva, video_arch
from flyeva.tasks.video.objective import VideoObjective


def resolve_split(split: SplitSection, role: str, cfg: VideoConfig) -> VideoList | None:
    """The split's videos; ShapeWorld clips are written under OUTPUT/data/<role> first (rank 0)."""
    if split.type == "none":
        return None
    if split.type == "shapeworld" and not split.path:
        folder = Path(cfg.train.output_dir) / "data" / role
        if D.is_main():
            write_shapeworld_clips(
                folder, split.num_samples or 512, seed=split.seed, image_size=split.image_size,
                num_frames=max(16, cfg.model.num_frames),
            )  # fmt: skip
        D.barrier()
        classes = cfg.data.classes or str(folder / "classes.txt")
        return load_video_list("shapeworld", str(folder / "list.csv"), "", classes)
    return load_video_list(split.type, split.path, split.root, cfg.data.classes)


def clip_shape(model: VideoEva) -> tuple[int, ...]:
    return (model.num_frames, 3, *model.patch_embed.img_size)


def make_evaluator(cfg: VideoConfig, videos: VideoList, model: VideoEva) -> VideoEvaluator:
    views = cfg.data.test_clips
    source = VideoSource(
        videos, get_decoder(cfg.data.decoder), model.num_frames, cfg.data.short_side, False, views
    )
    transform = ClipEvalTransform(model.patch_embed.img_size[0], views, cfg.data.test_crops)
    batch = cfg.data.val_batch_size or cfg.train.batch_size
    empty = (views * cfg.data.test_crops, *clip_shape(model))
    stream = eval_clip_stream(source, transform, batch, D.rank(), D.world_size(), empty)
    precision, batches = cfg.train.precision, cfg.data.max_val_batches
    return VideoEvaluator(stream, len(videos.classes), precision, batches, videos.classes)


def build_video(cfg: VideoConfig) -> Built:
    """The inflated video EVA, its loss (Mixup on clips, smoothing) and the clip stream."""
    D.init_distributed(cfg.train.device)
    train_videos = resolve_split(cfg.data.train, "train", cfg)
    val_videos = resolve_split(cfg.data.val, "val", cfg)
    classes = train_videos.classes
    model = build_model(cfg.model, classes, cfg.train.seed)
    aug = cfg.aug
    source = VideoSource(
        train_videos, get_decoder(cfg.data.decoder), model.num_frames, cfg.data.short_side, True
    )
    transform = ClipTrainTransform(
        model.patch_embed.img_size[0], aug.scales, aug.hflip, aug.color_jitter, aug.grayscale
    )
    stream = ClipBatchStream(
        source, transform, cfg.train.batch_size, clip_shape(model),
        rank=D.rank(), world_size=D.world_size(), seed=cfg.train.seed, drop_last=True,
    )  # fmt: skip
    mixup = dict(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob
    )
    arch, info = video_arch(model), {"init": cfg.model.init, "recipe": "flyeva video train"}

    def save_final(state: dict[str, torch.Tensor], folder: Path) -> None:
        save_weights(state, folder, kind="video", arch=arch, source=info, extra={"classes": classes})

    return Built(
        model,
        VideoObjective(len(classes), aug.smoothing, mixup),
        stream,
        save_final,
        evaluator=make_evaluator(cfg, val_videos, model) if val_videos is not None else None,
        facts={"num_classes": len(classes), "train_videos": len(train_videos)},
    )


def run_eval(cfg: VideoConfig) -> dict[str, Any]:
    """Multi-view evaluation of `model.init` (`eval_verb` defaults it to OUTPUT/final) -> OUTPUT/eval.json."""
    check_config(cfg)
    device = D.init_distributed(cfg.train.device)
    init = cfg.model.init
    if not Path(init).exists():
        raise FileNotFoundError(
            f"no model to evaluate at {init}; set model.init or run `flyeva video train` first"
        )
    out = Path(cfg.train.output_dir)
    with RunLock.hold(out, enabled=D.is_main()):  # never write beside a training run of this folder
        videos = resolve_split(cfg.data.val, "val", cfg)
        if videos is None:
            raise ValueError("data.val.type=none: give a validation list to evaluate on")
        model = build_model(cfg.model, videos.classes, cfg.train.seed).to(device).eval()
        evaluator = make_evaluator(cfg, videos, model)
        metrics = evaluator(model, StepContext(0, 0, 0, D.rank(), cfg.train.seed, device))
        if not D.is_main():
            return {}
        facts = {
            "views": cfg.data.test_clips, "crops": cfg.data.test_crops, "num_frames": model.num_frames,
            "classes": len(videos.classes),
        }  # fmt: skip
        return write_evaluation(out, "video", metrics, weights=init, facts=facts, details=evaluator.details())
