"""`flyeva video` configs (paper section 4.2; docs/video.md).

Schema defaults are the release's K400 stage of EVA-g (`EVA-01/video` configs/kinetics400_ft.yaml);
recipes in configs/video/ change only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flyeva.data.video.datasets import LIST_TYPES
from flyeva.data.video.decode import get_decoder
from flyeva.data.video.transforms import MULTI_SCALES
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.tasks.video.build import ModelSection, check_model_section


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
