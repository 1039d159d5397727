"""`flyeva classify knn`: weighted k-nearest-neighbour classification on frozen features (DINO's eval_knn):
each of the k most cosine-similar training samples votes for its class with weight exp(similarity / T)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flyeva.config import write_config
from flyeva.engine import distributed as D
from flyeva.engine.run import RunLock
from flyeva.engine.stage import result_record, write_result
from flyeva.tasks.classify.data import DataSection, prepare_data
from flyeva.tasks.classify.features import (
    EncoderSection,
    cached_features,
    frozen_feature_settings,
    load_frozen_encoder,
)


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1/top-5 (percent) of the weighted kNN vote; top-5 counts any of the 5 best-voted classes."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("kNN needs at least one training and one test feature")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    bank = F.normalize(train_features.float(), dim=1).t()
    hits1 = hits5 = 0
    for start in range(0, len(test_features), chunk_size):
        queries = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        labels = test_labels[start : start + chunk_size].to(queries.device)
        similarity, neighbours = (queries @ bank).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels.to(queries.device)[neighbours], (similarity / temperature).exp())
        ranked = votes.topk(min(5, num_classes), dim=1).indices
        hits1 += int((ranked[:, 0] == labels).sum())
        hits5 += int((ranked == labels[:, None]).any(1).sum())
    total = len(test_features)
    return {"top1": 100 * hits1 / total, "top5": 100 * hits5 / total}


@dataclass
class KnnSection:
    k: int = 20  # DINO's eval_knn default
    temperature: float = 0.07
    cache_dir: str = ""  # "" = <output_dir>/features (shared layout with the linear probe's cache)


@dataclass
class RunSection:
    output_dir: str = "runs/knn"
    device: str = "auto"
    batch_size: int = 128  # feature extraction, per rank
    num_workers: int = 8
    precision: str = "bf16"  # fp32 | bf16 | fp16, for the encoder forward
    seed: int = 0


@dataclass
class KnnConfig:
    model: EncoderSection = field(default_factory=EncoderSection)
    data: DataSection = field(default_factory=DataSection)
    knn: KnnSection = field(default_factory=KnnSection)
    train: RunSection = field(default_factory=RunSection)


def knn_verb(cfg: KnnConfig, args: Any = None) -> dict[str, Any]:
    """Extract (or reuse) train and val features, classify val by weighted kNN, write result.json."""
    with RunLock.hold(Path(cfg.train.output_dir), enabled=D.is_main()):
        record = run_knn(cfg)
    if record:
        print(f"classify knn: top-1 {record['metrics']['top1']:.2f} top-5 {record['metrics']['top5']:.2f}")
    return record


def run_knn(cfg: KnnConfig) -> dict[str, Any]:
    """`knn_verb`'s work: the result record, written on rank 0 (empty on other ranks)."""
    device = D.init_distributed(cfg.train.device)
    data = prepare_data(cfg.data, need_val=True)
    encoder = load_frozen_encoder(cfg.model, cfg.train.seed).to(device)
    image_size = encoder.patch_embed.img_size[0]
    out = Path(cfg.train.output_dir)
    extract, key = frozen_feature_settings(
        cfg.model, cfg.data, cfg.train, image_size, cfg.train.batch_size, device
    )
    cache_dir = cfg.knn.cache_dir or out / "features"
    train_features, train_labels = cached_features(encoder, data.train, "train", cache_dir, key, **extract)
    val_features, val_labels = cached_features(encoder, data.val, "val", cache_dir, key, **extract)
    tensors = [t.to(device) for t in (train_features, train_labels, val_features, val_labels)]
    metrics = knn_classify(
        *tensors, k=cfg.knn.k, temperature=cfg.knn.temperature, num_classes=data.num_classes
    )
    facts = {"k": cfg.knn.k, "temperature": cfg.knn.temperature, "num_classes": data.num_classes}
    facts.update(train_samples=len(train_features), val_samples=len(val_features))
    if not D.is_main():
        return {}
    write_config(cfg, out)
    record = result_record("classify knn", "knn", evaluations=[metrics], weights=cfg.model.init, facts=facts)
    write_result(out, record)
    return record
