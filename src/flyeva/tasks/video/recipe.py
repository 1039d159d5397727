"""`flyeva video train|eval`: action recognition on the shared engine (paper section 4.2; docs/video.md).

Schema defaults are the release's K400 stage of EVA-g (`EVA-01/video` configs/kinetics400_ft.yaml):
16 frames from the K722 model, 1 epoch at a constant lr 1e-6, layer decay 0.95, drop path 0.2, no
Mixup, label smoothing 0.1, AdamW (0.9, 0.98) eps 1e-6 wd 0.05, batch 256 in total; test 4 clips x
3 crops. Recipes in configs/video/ change only what differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flyeva.data.video.datasets import LIST_TYPES, VideoList, load_video_list, write_shapeworld_clips
from flyeva.data.video.decode import get_decoder
from flyeva.data.video.stream import ClipBatchStream, VideoSource, eval_clip_stream
from flyeva.data.video.transforms import MULTI_SCALES, ClipEvalTransform, ClipTrainTransform
from flyeva.engine import distributed as D
from flyeva.engine.loop import StepContext, TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.engine.run import RunLock
from flyeva.engine.stage import Built, write_evaluation
from flyeva.models.weights import save_weights
from flyeva.tasks.video.build import ModelSection, build_model, check_model_section
from flyeva.tasks.video.evaluate import VideoEvaluator, VideoObjective
from flyeva.tasks.video.model import VideoEva, video_arch

logger = logging.getLogger(__name__)


@dataclass
class SplitSection:
    type: str = "list"  # list (the release's `path label` files) | kinetics | folder | shapeworld | none
    path: str = ""  # the list / CSV file (folder: the root); shapeworld: "" = written into the output folder
    root: str = ""  # folder the list's paths start from (kinetics: the video folder)
    num_samples: int = 0  # shapeworld: clips to write
    seed: int = 0  # shapeworld only
    image_size: int = 32  # shapeworld only


@dataclass
class DataSection:
    train: SplitSection = field(default_factory=SplitSection)
    val: SplitSection = field(default_factory=SplitSection)
    classes: str = ""  # class names, one per line ("" = from the labels)
    decoder: str = "auto"  # auto (torchcodec when it loads, else PyAV) | pyav | torchcodec
    short_side: int = 256  # frames resized to this short side at decode (release: 256 for 224 crops)
    test_clips: int = 4  # views per video at test (release: 4)
    test_crops: int = 3  # crops per view at test (release: 3)
    val_batch_size: int = 0  # videos per evaluation batch (0 = train.batch_size)
    max_val_batches: int = 0  # 0 = the whole validation set


@dataclass
class AugSection:
    """Training augmentation of the release's video recipes (docs/video.md)."""

    scales: list[float] = field(default_factory=lambda: list(MULTI_SCALES))
    hflip: float = 0.5
    color_jitter: float = 0.8  # probability of brightness/contrast/saturation 0.4, hue 0.1
    grayscale: float = 0.2
    mixup: float = 0.0  # alpha; K722 stage 0.8
    cutmix: float = 0.0  # alpha; K722 stage 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1


def _video_optim() -> OptimConfig:
    return OptimConfig(
        lr=1e-6, min_lr=1e-6, weight_decay=0.05, betas=[0.9, 0.98], eps=1e-6, layer_decay=0.95,
        warmup_epochs=0, warmup="linear", schedule="constant", clip_grad=0.0,
    )  # fmt: skip


def _video_train() -> TrainConfig:
    # The release: 1 clip per GPU x 4 accumulation steps x 64 GPUs = 256 (configs/kinetics400_ft.yaml).
    return TrainConfig(
        output_dir="runs/video", epochs=1, batch_size=1, accum_steps=4, precision="fp16", strategy="zero1",
        checkpoint_every=500, seed=1024,
    )  # fmt: skip


@dataclass
class VideoConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    aug: AugSection = field(default_factory=AugSection)
    optim: OptimConfig = field(default_factory=_video_optim)
    train: TrainConfig = field(default_factory=_video_train)


def check_config(cfg: VideoConfig) -> None:
    """Every choice and range, before any data is read."""
    check_model_section(cfg.model)
    get_decoder(cfg.data.decoder)
    for role, split in (("train", cfg.data.train), ("val", cfg.data.val)):
        allowed = LIST_TYPES + (("none",) if role == "val" else ())
        if split.type not in allowed:
            raise ValueError(f"data.{role}.type must be one of {', '.join(allowed)}, got {split.type!r}")
        if split.type != "shapeworld" and split.type != "none" and not (split.path or split.root):
            raise ValueError(
                f"data.{role}.path is empty: give the {split.type} list (or data.{role}.type=shapeworld)"
            )
    if cfg.data.test_crops not in (1, 3) or cfg.data.test_clips < 1:
        raise ValueError(
            f"data.test_crops must be 1 or 3 and data.test_clips >= 1, "
            f"got {cfg.data.test_crops}, {cfg.data.test_clips}"
        )
    if not cfg.aug.scales or not all(0 < s <= 1 for s in cfg.aug.scales):
        raise ValueError(f"aug.scales must be fractions in (0, 1], got {cfg.aug.scales}")


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
    """Multi-view evaluation of `model.init` (default OUTPUT/final); writes OUTPUT/eval.json."""
    check_config(cfg)
    device = D.init_distributed(cfg.train.device)
    init = cfg.model.init or str(Path(cfg.train.output_dir) / "final")
    if not Path(init).exists():
        raise FileNotFoundError(
            f"no model to evaluate at {init}; set model.init or run `flyeva video train` first"
        )
    out = Path(cfg.train.output_dir)
    with RunLock.hold(out, enabled=D.is_main()):  # never write beside a training run of this folder
        videos = resolve_split(cfg.data.val, "val", cfg)
        if videos is None:
            raise ValueError("data.val.type=none: give a validation list to evaluate on")
        cfg.model.init = init
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
