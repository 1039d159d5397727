"""Frozen-encoder features for the linear probe and kNN: pooling, extraction, an on-disk cache."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models.eva import Eva
from torch import nn

from flyeva.data.stream import build_loader
from flyeva.engine import distributed as D
from flyeva.eval.classification import PRECISIONS
from flyeva.models.checkpoint import load_weights
from flyeva.models.eva import build_encoder, get_size, set_image_size
from flyeva.tasks.classify.data import eval_stream, is_indexable
from flyeva.tasks.classify.model import POOLS, check_choice, load_pretrained

logger = logging.getLogger(__name__)


@dataclass
class EncoderSection:
    init: str = ""  # the frozen encoder: flyeva folder, release MIM or EVA-CLIP checkpoint
    size: str = ""  # without init: a randomly initialised encoder of this size (a baseline)
    img_size: int = 0  # 0 = the checkpoint's resolution
    pool: str = "cls"  # cls | avg; docs/recipes.md §4: the CLS token for EVA-CLIP's linear probe
    num_heads: int = 0  # only for a release checkpoint of a size `flyeva models` does not name


def load_frozen_encoder(section: EncoderSection, seed: int = 0) -> Eva:
    """The encoder exactly as pretrained (final norm on every token), frozen, in eval mode."""
    check_choice("model.pool", section.pool, POOLS)
    if section.init:  # any starting point fine-tuning accepts, fine-tuned classifiers included
        weights = load_pretrained(section.init, section.num_heads)
        encoder = build_encoder(weights.size, release_init=False)
        load_weights(encoder, weights.encoder_state)
    elif section.size:
        torch.manual_seed(seed)
        encoder = build_encoder(get_size(section.size))
    else:
        raise ValueError(
            "no encoder: set model.init to pretrained weights (or model.size for a random baseline)"
        )
    if section.img_size and section.img_size != encoder.patch_embed.img_size[0]:
        set_image_size(encoder, section.img_size)
    return encoder.requires_grad_(False).eval()


def encoder_features(encoder: Eva, images: torch.Tensor, pool: str) -> torch.Tensor:
    """CLS token or mean of the patch tokens, after the encoder's final norm."""
    tokens = encoder.forward_features(images)
    return tokens[:, 0] if pool == "cls" else tokens[:, encoder.num_prefix_tokens :].mean(1)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    source: Any,
    *,
    pool: str,
    image_size: int,
    crop_pct: float,
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
    num_workers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's features (fp32, CPU), labels and source indices (-1 for streaming sources)."""
    rank, world = D.rank(), D.world_size()
    stream = eval_stream(source, image_size, crop_pct, batch_size, rank, world, return_ids=True)
    dtype = PRECISIONS[precision]
    features, labels, ids = [], [], []
    for batch in build_loader(stream, num_workers):
        if len(batch["images"]) == 0:
            continue
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features.append(encoder_features(encoder, batch["images"].to(device), pool).float().cpu())
        labels.append(batch["labels"])
        # RankShard numbers its samples 0..n-1; map them back to the source's own indices.
        ids.append(batch["ids"] * world + rank if is_indexable(source) else torch.full_like(batch["ids"], -1))
    if not features:
        no_ids = torch.empty(0, dtype=torch.long)
        return torch.empty(0, encoder.embed_dim), no_ids, no_ids.clone()
    return torch.cat(features), torch.cat(labels).long(), torch.cat(ids).long()


def frozen_feature_settings(
    model_cfg: Any, data_cfg: Any, run_cfg: Any, image_size: int, batch_size: int, device: torch.device
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`cached_features`' extraction arguments and cache key for one probe or kNN run; the key names
    everything the features depend on (encoder, pooling, resolution, crop, precision, seed)."""
    shared = dict(
        pool=model_cfg.pool, image_size=image_size, crop_pct=data_cfg.crop_pct, precision=run_cfg.precision
    )
    extract = dict(shared, batch_size=batch_size, device=device, num_workers=run_cfg.num_workers)
    key = dict(encoder=model_cfg.init or f"random {model_cfg.size}", **shared, seed=run_cfg.seed)
    return extract, key


def cached_features(
    encoder: nn.Module, source: Any, split: str, cache_dir: str | Path, key: dict[str, Any], **extract: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and labels of every readable sample, in source order, computed once per `key`: every
    rank extracts its share and the shares meet on disk (`cache_dir`), so each ends with the whole set."""
    cache_dir = Path(cache_dir)
    merged, key_file = cache_dir / f"{split}.safetensors", cache_dir / f"{split}.json"
    key = {**key, "split": split, "samples": len(source) if is_indexable(source) else None}
    if merged.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        logger.info("reusing cached %s features from %s", split, merged)
        cached = load_file(str(merged))
        return cached["features"], cached["labels"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    features, labels, ids = extract_features(encoder, source, **extract)
    rank, world = D.rank(), D.world_size()
    if world > 1:
        part = cache_dir / f"{split}-rank{rank}-of-{world}.safetensors"
        save_file({"features": features, "labels": labels, "ids": ids}, str(part))
        D.barrier()
        parts = [load_file(str(cache_dir / f"{split}-rank{r}-of-{world}.safetensors")) for r in range(world)]
        features, labels, ids = (
            torch.cat([p[name] for p in parts]) for name in ("features", "labels", "ids")
        )
    if len(ids) and ids.min() >= 0:
        order = ids.argsort()  # source order, whatever the number of ranks
        features, labels = features[order], labels[order]
    if D.is_main():
        save_file({"features": features.contiguous(), "labels": labels}, str(merged))
        key_file.write_text(json.dumps(key, indent=2))
    D.barrier()
    if world > 1 and D.is_main():
        for r in range(world):
            (cache_dir / f"{split}-rank{r}-of-{world}.safetensors").unlink(missing_ok=True)
    return features, labels
