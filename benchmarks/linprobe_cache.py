"""Linear-probe epoch time on live images vs on cached features, through the shared engine.

Live: every batch is decoded/transformed and runs through the frozen encoder, then the probe
(BatchNorm + Linear). Cached: the encoder runs once over the training set (`extract`), then every
epoch streams the cached features into the probe, in the same batch order. Both epochs go through
`flyeva.engine.loop.train` exactly as `flyeva classify linprobe` runs them (no evaluation).

    python benchmarks/linprobe_cache.py                        # eva_tiny @224, 512 ShapeWorld images
    python benchmarks/linprobe_cache.py --size eva_base --images 1024 --threads 2
    python benchmarks/linprobe_cache.py --device cuda --size eva_large --images 8192 --batch 256 --workers 8

The data are ShapeWorld scenes rendered at the encoder's resolution (rendering stands in for JPEG
decoding). The projection uses the release's 90 probe epochs (docs/recipes.md §4).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from flyeva.data.stream import ImageBatchStream
from flyeva.data.synthetic import ShapeWorld, ShapeWorldSource
from flyeva.data.transforms import EvalTransform
from flyeva.engine.loop import TrainConfig, train
from flyeva.engine.optim import OptimConfig, param_groups
from flyeva.eval.classification import ClassificationObjective
from flyeva.models.eva import build_encoder, get_size
from flyeva.tasks.classify.data import FeatureBatchStream
from flyeva.tasks.classify.features import extract_features
from flyeva.tasks.classify.probe import FrozenEncoderProbe, LinearProbeHead

RELEASE_EPOCHS = 90  # docs/recipes.md §4: the EVA-CLIP linear probe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_epoch(model: torch.nn.Module, stream, args: argparse.Namespace, folder: str, workers: int) -> float:
    """Seconds for one probe epoch through the engine (AdamW; the optimizer's cost is negligible here)."""
    config = TrainConfig(
        output_dir=folder,
        epochs=1,
        batch_size=args.batch,
        precision=args.precision,
        strategy="ddp",
        device=args.device,
        num_workers=workers,
        resume="never",
        checkpoint_every=10**9,
        tensorboard=False,
        progress=False,
        log_every=10**9,
    )
    optim = OptimConfig(lr=1e-3, weight_decay=0.0, warmup_epochs=0, clip_grad=0.0)
    sync(torch.device(args.device))
    start = time.perf_counter()
    train(model, ClassificationObjective(20), stream, config, optim, groups_fn=lambda m: param_groups(m, 0.0))
    sync(torch.device(args.device))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="eva_tiny", help="an EVA_SIZES name")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=None, help="fp32 | bf16 | fp16; default: fp32 CPU, bf16 CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = get_size(args.size)
    world = ShapeWorld(image_size=max(32, size.img_size))
    source = ShapeWorldSource(world, args.images, target="label")
    torch.manual_seed(0)
    encoder = build_encoder(size).to(device).requires_grad_(False).eval()
    transform = EvalTransform(size.img_size)
    load_before = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as folder:
        sync(device)
        start = time.perf_counter()
        features, labels, _ = extract_features(
            encoder,
            source,
            pool="cls",
            image_size=size.img_size,
            crop_pct=1.0,
            batch_size=args.batch,
            device=device,
            precision=args.precision,
            num_workers=args.workers,
        )
        sync(device)
        extract_s = time.perf_counter() - start

        live_model = FrozenEncoderProbe(encoder, LinearProbeHead(size.embed_dim, world.num_classes), "cls")
        live_stream = ImageBatchStream(source, transform, args.batch, drop_last=True)
        live_s = one_epoch(live_model, live_stream, args, str(Path(folder) / "live"), args.workers)

        cached_stream = FeatureBatchStream(features, labels, args.batch, drop_last=True)
        cached_model = LinearProbeHead(size.embed_dim, world.num_classes)
        cached_s = one_epoch(cached_model, cached_stream, args, str(Path(folder) / "cached"), 0)

    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, precision "
        f"{args.precision}; {args.size} @{size.img_size}, {args.images} images, batch {args.batch}, "
        f"{args.workers} workers"
    )
    print(f"{'path':<34} {'seconds':>8} {'images/s':>9}")
    print(f"{'feature extraction (once)':<34} {extract_s:>8.2f} {args.images / extract_s:>9.0f}")
    print(f"{'probe epoch, live images':<34} {live_s:>8.2f} {args.images / live_s:>9.0f}")
    print(f"{'probe epoch, cached features':<34} {cached_s:>8.3f} {args.images / cached_s:>9.0f}")
    print(f"speed-up per epoch: {live_s / cached_s:.1f}x")
    live_total, cached_total = RELEASE_EPOCHS * live_s, extract_s + RELEASE_EPOCHS * cached_s
    print(
        f"{RELEASE_EPOCHS} epochs: live {live_total:.0f} s, cached {cached_total:.0f} s "
        f"(extraction included): {live_total / cached_total:.1f}x"
    )
    load_after = os.getloadavg()[0]
    print(f"1-min load average before/after: {load_before:.1f} / {load_after:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
