"""`flyeva classify linprobe`: a linear classifier on a frozen encoder, as the release probes EVA-CLIP.

Head: BatchNorm1d without affine + Linear (MAE's `main_linprobe`); LARS (or SGD/AdamW); lr 1.0 at
batch 16000, no weight decay, 90 epochs with 10 warmup (docs/recipes.md §4). By default the features
are computed once and cached, and the probe trains on the cache in the batch order live images would
have; `probe.cache=false` runs the encoder on every batch instead (needed for augmentation).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flyeva.config import ConfigError
from flyeva.data.stream import ImageBatchStream
from flyeva.data.transforms import EvalTransform
from flyeva.engine import distributed as D
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig, build_adamw, param_groups, without_names
from flyeva.engine.stage import Built
from flyeva.eval.classification import ClassificationObjective, Evaluator
from flyeva.models.weights import save_weights
from flyeva.tasks.classify.data import (
    AugSection,
    DataSection,
    FeatureBatchStream,
    TrainTransform,
    eval_stream,
    prepare_data,
)
from flyeva.tasks.classify.features import (
    EncoderSection,
    cached_features,
    encoder_features,
    frozen_feature_settings,
    load_frozen_encoder,
)
from flyeva.tasks.classify.lars import LARS

logger = logging.getLogger(__name__)
OPTIMIZERS = ("lars", "sgd", "adamw")


class LinearProbeHead(nn.Module):
    """BatchNorm1d(affine=False, eps 1e-6) + Linear; weights trunc_normal(std 0.01), as MAE/MoCo v3."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features.float()))


def build_from_arch(arch: dict[str, Any]) -> LinearProbeHead:
    """The probe head a weights folder describes (the `probe` kind of models/weights.py)."""
    return LinearProbeHead(arch["dim"], arch["num_classes"])


class FrozenEncoderProbe(nn.Module):
    """A frozen encoder (always in eval mode, no gradients) feeding a `LinearProbeHead`."""

    def __init__(self, encoder: nn.Module, head: LinearProbeHead, pool: str):
        super().__init__()
        self.encoder, self.head, self.pool = encoder.requires_grad_(False), head, pool

    def train(self, mode: bool = True) -> FrozenEncoderProbe:
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: no drop path, the same features as the cache
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = encoder_features(self.encoder, images, self.pool)
        return self.head(features)


@dataclass
class ProbeSection:
    optimizer: str = "lars"  # lars | sgd | adamw; docs/recipes.md §4: LARS
    momentum: float = 0.9  # lars and sgd
    cache: bool = True  # features once, then train on the cache (no augmentation)
    cache_dir: str = ""  # "" = <output_dir>/features; reused when encoder and data match
    augment: bool = False  # RandomResizedCrop + flip each epoch (the release's); needs cache=false


def _probe_optim() -> OptimConfig:
    # docs/recipes.md §4 / the release's EVA-CLIP probe: lr 1.0 at batch 16000, wd 0, 10 warmup epochs.
    return OptimConfig(lr=1.0, min_lr=0.0, weight_decay=0.0, warmup_epochs=10, clip_grad=0.0)


def _probe_train() -> TrainConfig:
    return TrainConfig(
        output_dir="runs/linprobe",
        epochs=90,
        batch_size=400,
        precision="bf16",
        strategy="ddp",
        checkpoint_every=5000,
    )


@dataclass
class LinprobeConfig:
    model: EncoderSection = field(default_factory=EncoderSection)
    data: DataSection = field(default_factory=DataSection)
    probe: ProbeSection = field(default_factory=ProbeSection)
    optim: OptimConfig = field(default_factory=_probe_optim)
    train: TrainConfig = field(default_factory=_probe_train)


def probe_optimizer_fn(
    name: str, momentum: float
) -> Callable[[list[dict], OptimConfig], torch.optim.Optimizer]:
    """Builds the probe's optimizer from the engine's parameter groups (each group's lr set per step)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"probe.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")

    def build(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
        clean = without_names(groups)
        if name == "lars":
            return LARS(clean, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=momentum)
        if name == "sgd":
            return torch.optim.SGD(clean, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)
        return build_adamw(groups, cfg)

    return build


def check_linprobe(cfg: LinprobeConfig) -> None:
    """Every value checked before the features are extracted."""
    probe_optimizer_fn(cfg.probe.optimizer, cfg.probe.momentum)
    if cfg.optim.layer_decay != 1.0:
        raise ConfigError(
            f"optim.layer_decay={cfg.optim.layer_decay} does not apply to a linear probe (the encoder is "
            "frozen, the head is one layer); remove it, or use `flyeva classify finetune`"
        )
    if cfg.probe.augment and cfg.probe.cache:
        raise ConfigError("probe.augment=true needs probe.cache=false (a cache holds one view of each image)")


def build_linprobe(cfg: LinprobeConfig) -> Built:
    """A linear probe on a frozen encoder: on cached features (default) or on images each step."""
    device = D.init_distributed(cfg.train.device)
    data = prepare_data(cfg.data, need_val=False)
    encoder = load_frozen_encoder(cfg.model, cfg.train.seed).to(device)
    image_size = encoder.patch_embed.img_size[0]
    torch.manual_seed(cfg.train.seed)  # the same head on every rank, cached or not
    head = LinearProbeHead(encoder.embed_dim, data.num_classes)
    out = Path(cfg.train.output_dir)
    rank, world, batch_size, seed = D.rank(), D.world_size(), cfg.train.batch_size, cfg.train.seed
    val_stream = None
    if cfg.probe.cache:
        extract, key = frozen_feature_settings(cfg.model, cfg.data, cfg.train, image_size, batch_size, device)
        cache_dir = cfg.probe.cache_dir or out / "features"
        features, labels = cached_features(encoder, data.train, "train", cache_dir, key, **extract)
        model: nn.Module = head
        stream: Any = FeatureBatchStream(features, labels, batch_size, rank, world, seed, drop_last=True)
        cfg.train.num_workers = 0  # whole batches sliced from memory: no workers
        if data.val is not None:
            val_features, val_labels = cached_features(encoder, data.val, "val", cache_dir, key, **extract)
            # Every world-th sample from this rank's offset: each counted exactly once over all ranks.
            val_stream = FeatureBatchStream(val_features[rank::world], val_labels[rank::world], batch_size)
        del encoder  # the cache replaces it
    else:
        model = FrozenEncoderProbe(encoder, head, cfg.model.pool)
        if cfg.probe.augment:  # RandomResizedCrop(0.08, 1) + flip
            transform = TrainTransform(image_size, AugSection(auto_augment="", reprob=0.0, smoothing=0.0))
        else:
            transform = EvalTransform(image_size, cfg.data.crop_pct)
        stream = ImageBatchStream(data.train, transform, batch_size, rank, world, seed, drop_last=True)
        if data.val is not None:
            val_stream = eval_stream(data.val, image_size, cfg.data.crop_pct, batch_size, rank, world)
    evaluator = None
    if val_stream is not None:
        evaluator = Evaluator(
            val_stream, data.num_classes, cfg.train.precision, cfg.data.max_val_batches, classes=data.classes
        )
    meta = dict(encoder=cfg.model.init, pool=cfg.model.pool, image_size=image_size, classes=data.classes)
    optimizer = (cfg.probe.optimizer, cfg.probe.momentum)

    def save_final(state: dict[str, torch.Tensor], folder: Path) -> None:
        final = LinearProbeHead(head.linear.in_features, head.linear.out_features)
        kept = {k.removeprefix("head."): v for k, v in state.items() if not k.startswith("encoder.")}
        final.load_state_dict(kept)
        arch = {"dim": head.linear.in_features, "num_classes": head.linear.out_features}
        save_weights(final, folder, kind="probe", arch=arch, extra=meta)

    return Built(
        model,
        ClassificationObjective(data.num_classes),
        stream,
        save_final,
        evaluator=evaluator,
        groups_fn=lambda m: param_groups(m, cfg.optim.weight_decay),
        # AdamW is the engine's own (ZeRO-1 can shard it); LARS and SGD come from the probe
        optimizer_fn=None if optimizer[0] == "adamw" else probe_optimizer_fn(*optimizer),
        facts={"num_classes": data.num_classes},
    )
