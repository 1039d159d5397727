"""`flyeva clip train` / `flyeva clip zeroshot`: the config schema and the runs.

Defaults are EVA-CLIP-g's recipe where docs/recipes.md section 5 gives it (EVA-g vision, CLIP-L text,
embed 1024, fp16, ZeRO-1, global batch ~41k); the rest follows open_clip's large-batch recipes.
Training goes through the shared engine (`flyeva.engine.stage.run_stage`); this file only builds the
model, the data stream, the objective and the optimiser groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.data.sources import SourceConfig, build_sources
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.engine.stage import Built, as_evaluator
from flyeva.tasks.clip.init_weights import build_clip_from_config
from flyeva.tasks.clip.model import ClipModelSection, build_clip
from flyeva.tasks.clip.zeroshot import ZeroShotSection

logger = logging.getLogger(__name__)


@dataclass
class ClipDataSection:
    sources: list[SourceConfig] = field(default_factory=list)  # each with captions: docs/clip.md
    samples_per_epoch: int = 0  # required for mixtures
    # open_clip's CLIP training crop: RandomResizedCrop(scale (0.9, 1)), no flip, CLIP normalisation.
    scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    hflip: float = 0.0


@dataclass
class LossSection:
    # Micro-batch for the feature-caching accumulation (0 = the whole per-rank batch in one pass).
    micro_batch_size: int = 0


@dataclass
class ClipConfig:
    model: ClipModelSection = field(default_factory=ClipModelSection)
    data: ClipDataSection = field(default_factory=ClipDataSection)
    loss: LossSection = field(default_factory=LossSection)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)
    optim: OptimConfig = field(
        # open_clip's schedule (EVA-CLIP trains with it): warmup lr = peak * (s + 1) / W.
        default_factory=lambda: OptimConfig(
            lr=5e-4, min_lr=0.0, weight_decay=0.05, warmup_epochs=1.0, clip_grad=0.0, warmup="linear_plus_one"
        )
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(output_dir="runs/clip", batch_size=160, epochs=28)
    )


def _source(sections: list[SourceConfig], samples_per_epoch: int) -> Any:
    """Image-caption pairs (a ShapeWorld source defaults to 4096 scenes)."""
    if not sections:
        raise ConfigError("no training data: set data.sources (webdataset shards, a caption table or folder)")
    sections = [
        replace(s, num_samples=4096) if s.type == "shapeworld" and not s.num_samples else s for s in sections
    ]
    try:
        return build_sources(sections, samples_per_epoch, target="caption")
    except ValueError as error:
        raise ConfigError(f"data.sources: {error}") from None


def check_config(cfg: ClipConfig) -> None:
    if cfg.train.accum_steps != 1:
        raise ConfigError(
            f"train.accum_steps={cfg.train.accum_steps} would split the contrastive batch into separate "
            "losses; set train.accum_steps=1 and loss.micro_batch_size to accumulate with cached features"
        )
    if cfg.loss.micro_batch_size < 0:
        raise ConfigError("loss.micro_batch_size must be >= 0 (0 = no accumulation)")
    if cfg.optim.layer_decay != 1.0:  # each tower has its own: optim's would be silently ignored
        raise ConfigError(
            f"optim.layer_decay={cfg.optim.layer_decay} does not apply to CLIP; set "
            "model.vision.layer_decay and/or model.text.layer_decay instead"
        )
    cfg.train.check()


def _save_final(cfg: ClipConfig, state: dict[str, torch.Tensor], folder: Path, image_size: int) -> dict:
    """`folder` (the CLIP) and `folder`/visual (its vision encoder, an EVA encoder folder)."""
    from flyeva.models.eva import build_encoder, size_arch
    from flyeva.models.weights import save_weights
    from flyeva.tasks.clip.model import save_clip, vision_encoder_state

    final = build_clip(cfg.model, release_init=False)  # a plain copy: the trained one may be sharded
    final.load_state_dict(state)
    final.clamp_logit_scale()
    save_clip(final, cfg.model, folder)
    encoder = build_encoder(cfg.model.vision.size, release_init=False, img_size=image_size)
    encoder.load_state_dict(vision_encoder_state(final))
    source = {"from": "OUTPUT/final (EVA-CLIP vision tower)"}
    save_weights(encoder, folder / "visual", kind="encoder", arch=size_arch(encoder), source=source)
    logger.info("wrote %s (CLIP) and %s (vision encoder)", folder, folder / "visual")
    return {"logit_scale": float(final.logit_scale.detach().exp())}


def build_clip_train(cfg: ClipConfig) -> Built:
    """The CLIP model, its contrastive objective and the image-caption stream on the shared engine."""
    from flyeva.data.stream import ImageBatchStream
    from flyeva.data.transforms import PretrainTransform
    from flyeva.engine import distributed as D
    from flyeva.tasks.clip.loss import ClipObjective
    from flyeva.tasks.clip.model import clip_param_groups
    from flyeva.tasks.clip.zeroshot import ZeroShotSuite, resolve_device, tokenizer_for

    D.init_distributed(cfg.train.device)  # rank and world size are needed before the engine runs
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_clip_from_config(cfg.model)
    image_size = model.visual.patch_embed.img_size[0]
    stream = ImageBatchStream(
        _source(cfg.data.sources, cfg.data.samples_per_epoch),
        PretrainTransform(image_size=image_size, scale=tuple(cfg.data.scale), hflip=cfg.data.hflip),
        batch_size=cfg.train.batch_size,
        rank=D.rank(),
        world_size=D.world_size(),
        seed=cfg.train.seed,
    )
    if stream.target_type is not str:
        raise ConfigError(
            "the training data gives no captions; CLIP needs image-text pairs (wds target=txt, ...)"
        )
    objective = ClipObjective(tokenizer_for(cfg.model.text.context_length), cfg.loss.micro_batch_size)

    evaluate = None
    if cfg.zeroshot.during_training and cfg.zeroshot.datasets:
        suite = ZeroShotSuite(cfg.zeroshot, image_size)
        device = resolve_device(cfg.train.device)

        def evaluate(wrapped: torch.nn.Module, ctx: Any) -> dict[str, float]:
            # Every rank evaluates (FSDP needs all of them); the unwrapped model runs no DDP collectives.
            results = suite.run(D.unwrap(wrapped), ctx.device or device, retrieval=False)
            metrics = {f"zeroshot_{name}_top1": s["top1"] for name, s in results["datasets"].items()}
            metrics.update({k: v for k, v in results.items() if k not in ("datasets", "retrieval")})
            return metrics

    def groups_fn(base: torch.nn.Module) -> list[dict]:
        return clip_param_groups(base, cfg.model.vision, cfg.model.text, cfg.optim.lr, cfg.optim.weight_decay)

    return Built(
        model,
        objective,
        stream,
        lambda state, folder: _save_final(cfg, state, folder, image_size),
        evaluator=as_evaluator(evaluate),
        groups_fn=groups_fn,
    )


def run_zeroshot(cfg: ClipConfig, **reading: Any) -> dict[str, Any]:
    """Evaluate `zeroshot.checkpoint` (or the recipe's initial model) on the configured sets.

    The checkpoint is a flyeva CLIP folder or a file `load_any_clip` reads; `reading` holds its
    options (text_act, num_heads, text_heads) for files that cannot say everything.
    """
    from flyeva.tasks.clip.convert import load_any_clip
    from flyeva.tasks.clip.zeroshot import ZeroShotSuite, format_table, resolve_device, write_results

    zs = cfg.zeroshot
    if not zs.datasets and not zs.retrieval:
        raise ConfigError(
            "nothing to evaluate: give --dataset TYPE:PATH (or zeroshot.datasets / zeroshot.retrieval)"
        )
    device = resolve_device(zs.device)
    if zs.checkpoint:
        model, _, _ = load_any_clip(zs.checkpoint, **reading)
        checkpoint = Path(zs.checkpoint)
        default_output = (
            checkpoint / "zeroshot.json" if checkpoint.is_dir() else checkpoint.with_suffix(".zeroshot.json")
        )
    else:
        logger.info("no zeroshot.checkpoint: evaluating the recipe's initial model (vision/text init)")
        model = build_clip_from_config(cfg.model)
        default_output = Path(cfg.train.output_dir) / "zeroshot.json"
    model.to(device)
    suite = ZeroShotSuite(zs, model.visual.patch_embed.img_size[0])
    results = suite.run(model, device)
    print(format_table(results))
    path = write_results(results, zs.output or default_output)
    print(f"results written to {path}")
    return results
