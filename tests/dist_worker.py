"""Worker for tests/test_engine_distributed.py: one torchrun-style rank that trains every 2-rank scenario.

Run as `python tests/dist_worker.py WORKDIR` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set. It reads WORKDIR/init.pt (initial weights and images, so every run starts equal)
and writes WORKDIR/<scenario>/result-rank<r>.pt, or error-rank<r>.txt and exits 1 on the first failure.
The stream, objective and configs live here so the test's 1-process reference runs use the same ones.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from engine_run import train
from torch.utils.data import IterableDataset

from flyeva.data.masking import fixed_validation_mask
from flyeva.engine.checkpoint import full_model_state
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.models.eva import build_mim_model
from flyeva.pretrain.objective import mim_loss, pixel_targets

GLOBAL_BATCH = 8
EPOCHS, STEPS_PER_EPOCH = 2, 2  # 4 optimizer steps that cross an epoch boundary
NUM_IMAGES = EPOCHS * STEPS_PER_EPOCH * GLOBAL_BATCH
PATCH_SIZE, GRID = 4, (8, 8)  # the `miniature` EVA: 32 px images, 4 px patches
CLIP_GRAD = 1.0  # below the grad norms this run measures (about 0.3-2.9), so clipping engages

# name: (world size, strategy, micro batch per rank, accum steps); each gives a global batch of 8.
SCENARIOS: dict[str, tuple[int, str, int, int]] = {
    "single_b8": (1, "ddp", 8, 1),
    "single_b4x2": (1, "ddp", 4, 2),
    "ddp": (2, "ddp", 4, 1),
    "ddp_accum": (2, "ddp", 2, 2),
    "zero1": (2, "zero1", 4, 1),
    "fsdp": (2, "fsdp", 4, 1),
}
DIST_SCENARIOS = [name for name, spec in SCENARIOS.items() if spec[0] == 2]


class GlobalBatchSlices(IterableDataset):
    """Deterministic in-memory stream: each optimizer step consumes the next 8 images, split over ranks.

    Rank r, micro-step m of step s gets rows s*8 + (r*accum + m)*micro_batch onward, so every
    (world size, accum) layout sees the same 8 images per step and each epoch its own images.
    """

    def __init__(self, images: torch.Tensor, rank: int, micro_batch: int, accum_steps: int) -> None:
        self.images, self.rank = images, rank
        self.micro_batch, self.accum_steps = micro_batch, accum_steps
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: list[int]) -> None:
        self.epoch, self.skip = epoch, skip[0]

    def num_batches(self, num_workers: int) -> int:
        return STEPS_PER_EPOCH * self.accum_steps

    def __iter__(self):
        for index in range(self.skip, self.num_batches(0)):
            step, micro = divmod(index, self.accum_steps)
            first = (self.epoch * STEPS_PER_EPOCH + step) * GLOBAL_BATCH
            first += (self.rank * self.accum_steps + micro) * self.micro_batch
            images = self.images[first : first + self.micro_batch]
            yield {"images": images, "worker": 0, "index": index, "num_skipped": 0}


def fixed_mask_objective(
    model: torch.nn.Module, batch: dict[str, Any], ctx: Any
) -> tuple[torch.Tensor, dict]:
    """EVA's MIM loss with the fixed validation mask and pixel targets: nothing depends on rank or RNG."""
    images = batch["images"]
    mask = fixed_validation_mask(GRID).expand(images.shape[0], -1).to(images.device)
    loss = mim_loss(model(images, mask), pixel_targets(images, PATCH_SIZE)[mask])
    return loss, {}


def initial_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights and images every run starts from (written once by the test, read by every rank)."""
    torch.manual_seed(seed)
    model = build_mim_model("miniature", drop_path_rate=0.0, teacher_dim=PATCH_SIZE * PATCH_SIZE * 3)
    images = torch.randn(NUM_IMAGES, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return {"model": model.state_dict(), "images": images}


def run_scenario(name: str, init: dict[str, torch.Tensor], output_dir: Path, rank: int) -> dict[str, Any]:
    """Train one scenario from `init`; returns the full final weights and the logged history."""
    _, strategy, micro_batch, accum_steps = SCENARIOS[name]
    model = build_mim_model("miniature", drop_path_rate=0.0, teacher_dim=PATCH_SIZE * PATCH_SIZE * 3)
    model.load_state_dict(init["model"])
    stream = GlobalBatchSlices(init["images"], rank, micro_batch, accum_steps)
    cfg = TrainConfig(
        output_dir=str(output_dir),
        epochs=EPOCHS,
        steps_per_epoch=STEPS_PER_EPOCH,
        batch_size=micro_batch,
        accum_steps=accum_steps,
        precision="fp32",
        strategy=strategy,
        device="cpu",
        num_workers=0,
        seed=0,
        checkpoint_every=1000,  # only the end-of-run checkpoint
        keep_last=2,
        resume="never",
        tensorboard=False,
        progress=False,
        log_every=1,
    )
    # Warmup over the first epoch (lr 0, then peak/2) and cosine after, so lr varies every step.
    optim_cfg = OptimConfig(lr=2e-3, min_lr=1e-4, weight_decay=0.05, warmup_epochs=1.0, clip_grad=CLIP_GRAD)
    result = train(model, fixed_mask_objective, stream, cfg, optim_cfg)
    state = full_model_state(result.model)  # collective under FSDP2
    return {"state": state, "history": result.history, "step": result.step}


def main(workdir: Path) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    init = torch.load(workdir / "init.pt", weights_only=True)
    try:
        for name in DIST_SCENARIOS:
            folder = workdir / name
            folder.mkdir(parents=True, exist_ok=True)
            try:
                result = run_scenario(name, init, folder / "run", rank)
            except Exception:
                (folder / f"error-rank{rank}.txt").write_text(traceback.format_exc())
                return 1
            torch.save(result, folder / f"result-rank{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
