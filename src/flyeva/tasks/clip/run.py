"""`flyeva clip train` / `flyeva clip zeroshot`: the stage on the shared engine and the zero-shot run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from flyeva.config import ConfigError
from flyeva.data.stream import ImageBatchStream
from flyeva.data.transforms import PretrainTransform
from flyeva.engine import distributed as D
from flyeva.engine.stage import Built, as_evaluator
from flyeva.models.eva import build_encoder, size_arch
from flyeva.models.weights import save_weights
from flyeva.tasks.clip.config import ClipConfig, _source
from flyeva.tasks.clip.convert import load_any_clip
from flyeva.tasks.clip.init_weights import build_clip_from_config
from flyeva.tasks.clip.model import build_clip, clip_param_groups, save_clip
from flyeva.tasks.clip.objective import ClipObjective
from flyeva.tasks.clip.zeroshot import ZeroShotSuite, format_table, resolve_device, tokenizer_for

logger = logging.getLogger(__name__)


def _save_final(cfg: ClipConfig, state: dict[str, torch.Tensor], folder: Path, image_size: int) -> dict:
    """`folder` (the CLIP) and `folder`/visual (its vision encoder, an EVA encoder folder)."""
    final = build_clip(cfg.model, release_init=False)  # a plain copy: the trained one may be sharded
    final.load_state_dict(state)
    final.clamp_logit_scale()
    save_clip(final, cfg.model, folder)
    encoder = build_encoder(cfg.model.vision.size, release_init=False, img_size=image_size)
    encoder.load_state_dict({k: v for k, v in final.visual.state_dict().items() if not k.startswith("head.")})
    source = {"from": "OUTPUT/final (EVA-CLIP vision tower)"}
    save_weights(encoder, folder / "visual", kind="encoder", arch=size_arch(encoder), source=source)
    logger.info("wrote %s (CLIP) and %s (vision encoder)", folder, folder / "visual")
    return {"logit_scale": float(final.logit_scale.detach().exp())}


def build_clip_train(cfg: ClipConfig) -> Built:
    """The CLIP model, its contrastive objective and the image-caption stream on the shared engine."""
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
    """Evaluate `zeroshot.checkpoint` (or the recipe's initial model) on the configured sets; `reading`:
    `load_any_clip`'s options for files that cannot say everything."""
    zs = cfg.zeroshot
    if not zs.datasets and not zs.retrieval:
        raise ConfigError(
            "nothing to evaluate: give --dataset TYPE:PATH (or zeroshot.datasets / zeroshot.retrieval)"
        )
    device = resolve_device(zs.device)
    if zs.checkpoint:
        model, _, _ = load_any_clip(zs.checkpoint, **reading)
    else:
        logger.info("no zeroshot.checkpoint: evaluating the recipe's initial model (vision/text init)")
        model = build_clip_from_config(cfg.model)
    model.to(device)
    suite = ZeroShotSuite(zs, model.visual.patch_embed.img_size[0])
    results = suite.run(model, device)
    print(format_table(results))
    path = Path(zs.output or Path(cfg.train.output_dir) / "zeroshot.json")  # never inside a weights folder
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {path}")
    return results
