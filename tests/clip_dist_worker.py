"""Worker for tests/test_clip_dist.py: one torchrun-style rank of the 2-rank contrastive-loss checks.

Run as `python tests/clip_dist_worker.py WORKDIR` with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT set. Every rank builds the same tiny CLIP and the same global batch, takes its own
rows, runs `ClipObjective` on the DDP-wrapped model, and writes WORKDIR/result-rank<r>.pt with the
loss averaged over ranks and the (DDP-averaged) gradients of every scenario; or error-rank<r>.txt.
The test computes the 1-process references with the same `tiny_clip` / `global_batch`.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from flyeva.engine import distributed as D
from flyeva.tasks.clip.model import ClipModelSection, EvaClip, TextSection, VisionSection, build_clip
from flyeva.tasks.clip.objective import ClipObjective
from flyeva.tasks.clip.zeroshot import tokenizer_for

CONTEXT = 16
GLOBAL_BATCH = 8
# name: (micro_batch_size, rows of the global batch given to rank 0, to rank 1).
SCENARIOS = {
    "one_pass": (0, range(0, 4), range(4, 8)),
    "micro_batches": (2, range(0, 4), range(4, 8)),
    # Rank 0 lost one pair (an unreadable image): 3 + 4 = 7 valid pairs, padded to 4 rows per rank.
    "uneven": (0, range(0, 3), range(4, 8)),
    "uneven_micro_batches": (2, range(0, 3), range(4, 8)),
}


@functools.cache
def _tiny_clip_template(drop_path_rate: float) -> EvaClip:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = TextSection(width=32, heads=2, layers=2, context_length=CONTEXT, quick_gelu=True)
        vision = VisionSection(size="miniature", drop_path_rate=drop_path_rate)
        # timm's init instead of the release's (same architecture, built in a fraction of the time),
        # with the head at the release's scale rather than timm's x0.001 (tiny, ill-conditioned features).
        model = build_clip(ClipModelSection(embed_dim=24, vision=vision, text=text), release_init=False)
        torch.nn.init.trunc_normal_(model.visual.head.weight, std=0.015)
        return model


def tiny_clip(drop_path_rate: float = 0.0) -> EvaClip:
    """The same tiny CLIP (miniature EVA, 2-layer text tower) on every call; built once per process."""
    return copy.deepcopy(_tiny_clip_template(drop_path_rate))


def global_batch(seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=generator)
    texts = [f"a photo of shape number {i} in colour {7 * i % 5}" for i in range(GLOBAL_BATCH)]
    return {"images": images, "texts": texts}


class BackwardContext:
    """The part of the engine's StepContext an objective needs: a plain fp32 backward."""

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()


def run_objective(model: torch.nn.Module, batch: dict, micro_batch_size: int) -> tuple[float, dict]:
    """Loss and gradients of one step of `ClipObjective` (gradients as the optimizer would see them)."""
    objective = ClipObjective(tokenizer_for(CONTEXT), micro_batch_size)
    loss, _ = objective(model, batch, BackwardContext())
    base = D.unwrap(model)
    grads = {name: p.grad.detach().clone() for name, p in base.named_parameters() if p.grad is not None}
    return float(loss), grads


def main(workdir: Path) -> int:
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo")
        batch = global_batch()
        results = {}
        for name, (micro, *rows_per_rank) in SCENARIOS.items():
            rows = list(rows_per_rank[rank])
            local = {"images": batch["images"][rows], "texts": [batch["texts"][i] for i in rows]}
            model = torch.nn.parallel.DistributedDataParallel(tiny_clip())
            local_loss, grads = run_objective(model, local, micro)
            mean_loss = D.all_reduce_sum(torch.tensor(local_loss, dtype=torch.float64)) / D.world_size()
            results[name] = {"loss": float(mean_loss), "grads": grads}
        torch.save(results, workdir / f"result-rank{rank}.pt")
    except Exception:
        (workdir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
