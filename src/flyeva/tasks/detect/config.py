"""`flyeva detect` configs: schema defaults are the release's EVA-g COCO recipe (release `EVA-01/det`).

Recipes in configs/detect/ are short deltas on these defaults (eva_giant_lvis, eva_giant_o365,
eva_base_coco, miniature).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flyeva.config import ConfigError
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig


@dataclass
class ModelSection:
    init: str = ""  # encoder weights, a `detector` folder, or a release detection .pth; "" = from scratch
    size: str = "eva_giant"  # the encoder size when training from scratch (and the check on init)
    patch_size: int = 16  # EVA's 14 resized bicubically (release `EVA-01/det`)
    img_size: int = 1280  # the LSJ crop and square pad
    window: int = 16
    # rel-pos tables resized to another grid (1536 test of 1280 training): "beit" is the release's cubic
    # fit on geometric offsets (`cascade_mask_rcnn_vitdet_eva_1536.py`), "linear" ViTDet's (docs/detect.md)
    rel_pos_interp: str = "beit"
    global_blocks: list[int] = field(default_factory=list)  # empty: evenly spaced (g 3,7,...,39; B 2,5,8,11)
    pos_grid: int = 0  # 0: the encoder's table at its pretraining size (224 / 16 = 14, as the release)
    pyramid_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5])
    out_channels: int = 256
    drop_path_rate: float = 0.6
    grad_checkpointing: bool = True
    freeze_patch_embed: bool = True  # the release freezes it for detection
    weight_decay_all: bool = True  # the release decays norms, biases and pos_embed too (docs/detect.md)
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    rpn_pre_nms_train: int = 2000
    rpn_post_nms_train: int = 1000
    rpn_pre_nms_test: int = 1000
    rpn_post_nms_test: int = 1000
    rpn_batch_size: int = 256
    box_conv_dims: list[int] = field(default_factory=lambda: [256] * 4)  # 4conv1fc with LayerNorm
    box_fc_dims: list[int] = field(default_factory=lambda: [1024])
    mask_dims: list[int] = field(default_factory=lambda: [256] * 4)
    # false: Cascade R-CNN boxes only, no mask branch (box-only sets such as Objects365; eva_giant_o365)
    mask_head: bool = True
    roi_batch_size: int = 512
    roi_positive_fraction: float = 0.25
    classifier: str = "softmax"  # softmax (COCO) | sigmoid_fed (LVIS: sigmoid + federated loss)
    fed_loss_classes: int = 50


@dataclass
class DataSection:
    train_json: str = ""  # REQUIRED for real data; "" with shapeworld_train > 0 writes a ShapeWorld export
    train_images: str = ""  # "" = the folder `images` next to the json
    val_json: str = ""
    val_images: str = ""
    lsj_min_scale: float = 0.1
    lsj_max_scale: float = 2.0
    flip: float = 0.5
    repeat_threshold: float = 0.0  # > 0: repeat-factor sampling (LVIS 0.001)
    shapeworld_train: int = 0  # ShapeWorld images exported into OUTPUT/shapeworld when train_json is ""
    shapeworld_val: int = 0
    shapeworld_size: int = 64
    shapeworld_seed: int = 0


@dataclass
class TestSection:
    size: int = 1536  # longest side at test (release COCO/LVIS: 1536)
    score_threshold: float = 0.05
    nms: str = "soft"  # soft (linear, COCO release) | hard
    nms_threshold: float = 0.6
    soft_min_score: float = 1e-3
    detections_per_image: int = 100
    maskness: bool = True  # box score x mean mask probability above 0.5 (COCO release)
    lvis: bool = False  # LVIS evaluation (APr/APc/APf)
    extra_caps: list[int] = field(default_factory=list)  # also evaluate at these per-image caps (LVIS 1000)
    batch_size: int = 1
    max_images: int = 0  # evaluate on the first N images only (0 = all)


def _optim() -> OptimConfig:
    # Release `EVA-01/det` COCO: AdamW (0.9, 0.999), lr 2.5e-5 at batch 64, wd 0.1, layer decay 0.9,
    # warmup 500 (detectron2's factor warmup from 0.001), x0.1 at 40k of 45k, no clipping.
    return OptimConfig(
        lr=2.5e-5, min_lr=0.0, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8, layer_decay=0.9,
        warmup_steps=500, warmup="factor", warmup_factor=0.001, schedule="step", decay_steps=[40000],
        decay_factor=0.1, clip_grad=0.0,
    )  # fmt: skip


def _train() -> TrainConfig:
    # batch 64 = 1 image x 64 GPUs, fp16; epochs 0 = counted in iterations: raise max_steps to extend
    return TrainConfig(
        output_dir="runs/detect", epochs=0, max_steps=45000, batch_size=1, precision="fp16",
        strategy="ddp", num_workers=4, checkpoint_every=5000, eval_every_epochs=1000,
    )  # fmt: skip


@dataclass
class DetectConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    test: TestSection = field(default_factory=TestSection)
    optim: OptimConfig = field(default_factory=_optim)
    train: TrainConfig = field(default_factory=_train)


CLASSIFIERS = ("softmax", "sigmoid_fed")
# The largest training crop (model.img_size) and test side (test.size) accepted, in pixels: the
# release's sides are 1024-1536; a side of 10^5 would build position and rel-pos tables and padded
# batches that exhaust memory before any check could name the key.
MAX_SIDE = 4096


def validate(cfg: DetectConfig, need_train: bool = True) -> None:
    """Reject bad values before any work starts: one line each, naming the key."""
    m, d, t = cfg.model, cfg.data, cfg.test
    if m.classifier not in CLASSIFIERS:
        raise ConfigError(f"model.classifier={m.classifier!r} is not one of {list(CLASSIFIERS)}")
    if m.rel_pos_interp not in ("linear", "beit"):
        raise ConfigError(f"model.rel_pos_interp={m.rel_pos_interp!r} must be 'linear' or 'beit'")
    if t.nms not in ("soft", "hard"):
        raise ConfigError(f"test.nms={t.nms!r} must be 'soft' or 'hard'")
    if m.img_size % (m.patch_size * 2) or m.img_size <= 0:
        raise ConfigError(f"model.img_size={m.img_size} must be a positive multiple of 2 x patch_size")
    if m.img_size > MAX_SIDE:
        raise ConfigError(
            f"model.img_size={m.img_size} is over the limit of {MAX_SIDE} px (release: 1024-1280)"
        )
    if not 0 < t.size <= MAX_SIDE:
        raise ConfigError(
            f"test.size={t.size} must be in [1, {MAX_SIDE}] px (the longest side at test; 1536)"
        )
    if t.detections_per_image < 1 or any(cap < 1 for cap in t.extra_caps):
        caps = [t.detections_per_image, *t.extra_caps]
        raise ConfigError(f"test.detections_per_image and test.extra_caps must be >= 1, got {caps}")
    if t.batch_size < 1 or t.max_images < 0:
        raise ConfigError(
            f"test.batch_size must be >= 1 and test.max_images >= 0, got {t.batch_size}, {t.max_images}"
        )
    if len(m.anchor_sizes) != len(m.pyramid_scales) + 1:
        raise ConfigError(
            f"model.anchor_sizes needs {len(m.pyramid_scales) + 1} sizes (pyramid levels + P6), "
            f"got {m.anchor_sizes}"
        )
    if not 0 < d.lsj_min_scale <= d.lsj_max_scale:
        raise ConfigError(
            f"data.lsj_min_scale/lsj_max_scale must satisfy 0 < min <= max, got {d.lsj_min_scale}"
        )
    if need_train and not d.train_json and d.shapeworld_train <= 0:
        raise ConfigError("data.train_json is empty; set it (COCO-format json) or data.shapeworld_train=N")
    cfg.train.check()  # before any data is prepared
    if cfg.optim.schedule != "step" and cfg.optim.decay_steps:
        raise ConfigError("optim.decay_steps applies to optim.schedule=step only")


def arch_from_config(cfg: DetectConfig, encoder_dims: dict[str, int], num_classes: int) -> dict[str, Any]:
    """The json-able architecture of `EvaDetector` for this config and encoder."""
    from flyeva.tasks.detect.backbone import global_block_indices

    m = cfg.model
    backbone = dict(encoder_dims, img_size=m.img_size, patch_size=m.patch_size, window=m.window)
    backbone.update(
        global_blocks=list(m.global_blocks) or global_block_indices(encoder_dims["depth"]),
        pyramid_scales=list(m.pyramid_scales), out_channels=m.out_channels,
    )  # fmt: skip
    rpn = {
        "anchor_sizes": list(m.anchor_sizes), "aspect_ratios": [0.5, 1.0, 2.0],
        "pre_nms_train": m.rpn_pre_nms_train, "post_nms_train": m.rpn_post_nms_train,
        "pre_nms_test": m.rpn_pre_nms_test, "post_nms_test": m.rpn_post_nms_test, "nms": 0.7,
        "batch_size_per_image": m.rpn_batch_size,
    }  # fmt: skip
    heads = {
        "num_classes": num_classes, "conv_dims": list(m.box_conv_dims), "fc_dims": list(m.box_fc_dims),
        "mask_dims": list(m.mask_dims) if m.mask_head else [], "batch_size_per_image": m.roi_batch_size,
        "positive_fraction": m.roi_positive_fraction, "classifier": m.classifier,
        "fed_loss_classes": m.fed_loss_classes,
    }  # fmt: skip
    arch = {"backbone": backbone, "rpn": rpn, "roi_heads": heads}
    return apply_test_settings(arch, cfg.test, m.img_size)


def apply_test_settings(arch: dict[str, Any], test: TestSection, square_size: int) -> dict[str, Any]:
    """The arch with this run's test-time settings (a saved detector evaluates with the caller's)."""
    heads = dict(arch["roi_heads"])
    heads.update(
        score_threshold=test.score_threshold, nms=test.nms, nms_threshold=test.nms_threshold,
        soft_min_score=test.soft_min_score,
        detections_per_image=max([test.detections_per_image, *test.extra_caps]), maskness=test.maskness,
    )  # fmt: skip
    return dict(arch, roi_heads=heads, square_size=square_size)
