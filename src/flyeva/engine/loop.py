"""The one training loop every stage uses. It knows models, objectives and batch streams, not EVA.

An objective is `objective(model, batch, ctx) -> (loss, metrics)`; one that sets
`handles_backward = True` calls `ctx.backward(loss)` itself (e.g. CLIP's cached-feature
accumulation, several backwards per batch) and returns the loss for logging. A stream is an IterableDataset
with `set_epoch(epoch, skip)` and `num_batches(num_workers)` whose batches are dicts carrying
`worker` and `index` (their ordinal within the worker), which is what makes resume exact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from flyeva.engine import distributed as D
from flyeva.engine.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from flyeva.engine.metrics import MetricsLogger
from flyeva.engine.optim import OptimConfig, adamw_flags, apply_lr, build_adamw, lr_at, param_groups
from flyeva.engine.scaler import HysteresisGradScaler, ShardedHysteresisGradScaler

logger = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How to run: batch, precision, distribution, checkpoints. Defaults follow EVA_SPEC section 3."""

    output_dir: str = "runs/pretrain"
    epochs: int = 150
    steps_per_epoch: int = 0  # 0 = derive from the data; required for streaming sources
    batch_size: int = 32  # per rank per micro-step; the release ran 32 x 128 GPUs = 4096
    accum_steps: int = 1
    precision: str = "fp16"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    strategy: str = "zero1"  # ddp | zero1 (optimizer state sharded) | fsdp (FSDP2)
    device: str = "auto"
    num_workers: int = 8
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in output_dir) | never | a checkpoint path
    log_every: int = 10
    eval_every_epochs: int = 1
    max_consecutive_nonfinite: int = 5  # then roll back to the last checkpoint
    max_rollbacks: int = 3
    max_steps: int = 0  # stop early after this many optimizer steps (0 = the full schedule)
    ema_decay: float = 0.0  # model EMA (0 = off); evaluation then also reports ema_* metrics
    fp16_init_scale: float = 65536.0  # EVA_SPEC section 3: initial scale 2^16
    fp16_growth_interval: int = 500  # EVA_SPEC section 3: loss-scale window 500
    fp16_hysteresis: int = 2  # EVA_SPEC section 3: the 2nd overflow before the scale grows halves it
    fp16_min_scale: float = 1.0  # EVA_SPEC section 3
    tensorboard: bool = True
    progress: bool = True
    # torch.compile (inductor) of the wrapped model, in place so names and checkpoints are unchanged;
    # fuses the elementwise work between GEMMs (docs/performance.md). The first steps compile.
    compile: bool = False


@dataclass
class StepContext:
    """What an objective may need besides the batch: where in the run this micro-step is."""

    epoch: int
    step: int
    micro: int
    rank: int
    seed: int
    device: torch.device
    backward: Callable[[torch.Tensor], None] | None = None  # scaled backward, for objectives doing their own


@dataclass
class TrainResult:
    model: nn.Module
    step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped_images: int = 0
    nonfinite_steps: int = 0
    ema_model: nn.Module | None = None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _build_optimizer(groups: list[dict], cfg: OptimConfig, strategy: str) -> torch.optim.Optimizer:
    if strategy == "zero1" and D.world_size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        clean = [{k: v for k, v in g.items() if k != "param_names"} for g in groups]
        first, rest = clean[0], clean[1:]
        zero = ZeroRedundancyOptimizer(
            first["params"],
            optimizer_class=torch.optim.AdamW,
            lr=cfg.lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=first["weight_decay"],
            **adamw_flags(cfg.implementation),
        )
        zero.param_groups[0].update({k: v for k, v in first.items() if k != "params"})
        for group in rest:
            zero.add_param_group(group)
        return zero
    return build_adamw(groups, cfg)


def keep_freed_memory() -> bool:
    """Let glibc keep freed tensors for reuse instead of returning them to the kernel (CPU training).

    A training step frees and reallocates the same activation sizes every step. By default glibc
    maps every block over its mmap threshold (at most 32 MiB) afresh and trims the heap top on
    free, so each step page-faults its activations in again (docs/performance.md: 69% -> 78% of
    the matmul ceiling for an eva_base step). Here every block comes from the heap and the heap is
    never trimmed, so the process keeps its peak memory. Returns False where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt takes a C int: a larger Python int wraps silently (2**34 became 0, i.e. trim on every free).
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_max = -1, -4
    # man mallopt: a trim threshold of -1 disables trimming; an mmap maximum of 0 disables per-block mmap.
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def _make_scaler(precision: str, device: torch.device, cfg: TrainConfig, sharded: bool) -> Any:
    kwargs = dict(
        init_scale=cfg.fp16_init_scale,
        growth_interval=cfg.fp16_growth_interval,
        hysteresis=cfg.fp16_hysteresis,
        min_scale=cfg.fp16_min_scale,
        enabled=precision == "fp16",
    )
    if sharded and precision == "fp16":
        return ShardedHysteresisGradScaler(device.type, **kwargs)
    return HysteresisGradScaler(device.type, **kwargs)


def _resolve_resume(cfg: TrainConfig, folder: Path) -> Path | None:
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(folder)
        return found[-1] if found else None
    path = Path(cfg.resume)
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist; use resume=auto or a valid path")
    return path


def train(
    model: nn.Module,
    objective: Callable[[nn.Module, dict[str, Any], StepContext], tuple[torch.Tensor, dict[str, Any]]],
    stream: Any,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    *,
    groups_fn: Callable[[nn.Module], list[dict]] | None = None,
    evaluate: Callable[[nn.Module, StepContext], dict[str, float]] | None = None,
    optimizer_fn: Callable[[list[dict], OptimConfig], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train `model` on `stream` with `objective`; resumable, distributed, mixed precision.

    `optimizer_fn(groups, optim_cfg)` replaces AdamW (e.g. LARS for linear probes); the engine still
    sets every group's lr (times its `lr_scale`) at every step.
    """
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {cfg.precision!r}")
    device = D.init_distributed(cfg.device)
    rank, world = D.rank(), D.world_size()
    torch.manual_seed(cfg.seed + rank)  # drop path differs per rank, reproducibly
    folder = Path(cfg.output_dir)
    ckpt_folder = folder / "checkpoints"

    if device.type == "cpu":
        keep_freed_memory()
    wrapped = D.wrap_model(model, cfg.strategy, device)
    if cfg.compile:
        wrapped.compile()
    if isinstance(objective, nn.Module):
        objective.to(device)
    base = D.unwrap(wrapped)
    if groups_fn is None:
        groups = param_groups(base, optim_cfg.weight_decay, layer_decay=optim_cfg.layer_decay)
    else:
        groups = groups_fn(base)
    if optimizer_fn is None:
        optimizer = _build_optimizer(groups, optim_cfg, cfg.strategy)
    elif cfg.strategy == "zero1" and world > 1:
        raise ValueError("a custom optimizer cannot be sharded by ZeRO-1 here; use strategy=ddp")
    else:
        optimizer = optimizer_fn(groups, optim_cfg)
    sharded = cfg.strategy == "fsdp" and world > 1
    scaler = _make_scaler(cfg.precision, device, cfg, sharded)
    autocast_dtype = PRECISIONS[cfg.precision]
    ema = None
    if cfg.ema_decay > 0:
        if cfg.strategy == "fsdp" and world > 1:
            raise ValueError("ema_decay is not supported with strategy=fsdp; use ddp or zero1")
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(base, decay=cfg.ema_decay)

    micro_per_epoch = cfg.steps_per_epoch * cfg.accum_steps
    if not micro_per_epoch:
        batches = stream.num_batches(cfg.num_workers)
        if not batches:
            raise ValueError("the data stream has no fixed length; set steps_per_epoch in the config")
        micro_per_epoch = batches // cfg.accum_steps * cfg.accum_steps
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch has fewer batches than accum_steps={cfg.accum_steps}; "
            "use more data or fewer accum_steps"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = int(optim_cfg.warmup_epochs * steps_per_epoch)

    step, epoch, micro_in_epoch, skip = 0, 0, 0, [0] * max(1, cfg.num_workers)
    resume_from = _resolve_resume(cfg, ckpt_folder)
    if resume_from is not None:
        extra = load_checkpoint(resume_from, wrapped, optimizer)
        scaler.load_state_dict(extra["scaler"])
        if ema is not None:
            ema.module.load_state_dict(extra["ema"])
        step, epoch, micro_in_epoch = extra["step"], extra["epoch"], extra["micro_in_epoch"]
        skip = list(extra["skip"])
        if len(skip) != max(1, cfg.num_workers):
            raise ValueError(
                f"{resume_from} was written with num_workers={len(skip)}; resume with the same num_workers "
                "so the data continues exactly"
            )
        restore_rng(extra)
        logger.info("resumed from %s at step %d (epoch %d)", resume_from, step, epoch)

    log = MetricsLogger(
        folder,
        enabled=D.is_main(),
        tensorboard=cfg.tensorboard,
        progress=cfg.progress,
        total_steps=cfg.max_steps or total_steps,
        start_step=step,
    )
    result = TrainResult(model=wrapped, step=step, ema_model=ema.module if ema is not None else None)

    def backward(loss: torch.Tensor) -> None:
        scaler.scale(loss / cfg.accum_steps).backward()

    handles_backward = getattr(objective, "handles_backward", False)
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    consecutive_nonfinite, rollbacks = 0, 0
    last_time, last_step = time.time(), step

    def checkpoint_now() -> None:
        extra = {
            "step": step,
            "epoch": epoch,
            "micro_in_epoch": micro_in_epoch,
            "skip": skip,
            "scaler": scaler.state_dict(),
        }
        if ema is not None:
            extra["ema"] = ema.module.state_dict()
        save_checkpoint(ckpt_folder, step, wrapped, optimizer, extra, cfg.keep_last)

    wrapped.train()
    while step < stop_at:
        if micro_in_epoch >= micro_per_epoch:
            epoch, micro_in_epoch, skip = epoch + 1, 0, [0] * len(skip)
        stream.set_epoch(epoch, skip)
        # A private generator: DataLoader would otherwise draw from the global RNG (drop path's) per epoch.
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        epoch_images = torch.zeros(2, dtype=torch.float64)  # (seen, skipped)
        micro_at_start = micro_in_epoch
        accumulated = torch.zeros(2, dtype=torch.float64, device=device)  # (loss sum, non-finite count)
        for batch in loader:
            skip[batch["worker"]] = batch["index"] + 1
            epoch_images += torch.tensor([len(batch[_image_key(batch)]), batch.get("num_skipped", 0)])
            batch = _to_device(batch, device)
            micro = micro_in_epoch % cfg.accum_steps
            ctx = StepContext(epoch, step, micro, rank, cfg.seed, device, backward)
            last_micro = micro == cfg.accum_steps - 1
            with D.grad_sync_context(wrapped, last_micro):
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss, metrics = objective(wrapped, batch, ctx)
                if not handles_backward:
                    backward(loss)
            # Kept on the device: no host sync per micro-step, one all-reduce per optimizer step.
            detached = loss.detach().double()
            finite = torch.isfinite(detached)
            accumulated += torch.stack([torch.where(finite, detached, 0.0), (~finite).double()])
            micro_in_epoch += 1
            if not last_micro:
                continue

            loss_sum, nonfinite = D.all_reduce_sum(accumulated).tolist()
            accumulated.zero_()
            apply_lr(optimizer, lr_at(step, total_steps, warmup_steps, optim_cfg.lr, optim_cfg.min_lr))
            grad_norm = None
            if nonfinite:
                # Skip the update on every rank together; roll back after too many in a row.
                optimizer.zero_grad(set_to_none=True)
                result.nonfinite_steps += 1
                consecutive_nonfinite += 1
                log.line(f"step {step}: non-finite loss on {int(nonfinite)} micro-batch(es), update skipped")
                if consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                    rollbacks += 1
                    _roll_back(ckpt_folder, wrapped, optimizer, scaler, rollbacks, cfg.max_rollbacks)
                    log.line(f"step {step}: rolled back weights to the last checkpoint ({rollbacks})")
                    consecutive_nonfinite = 0
            else:
                consecutive_nonfinite = 0
                if optim_cfg.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), optim_cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(base)  # constant decay from step 1 (timm warms it up when given a step)
            step += 1

            values = {
                "loss": loss_sum / max(1.0, world * cfg.accum_steps - nonfinite),
                "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                "epoch": epoch,
            }
            if cfg.precision == "fp16":
                values["loss_scale"] = scaler.get_scale()
            if step % cfg.log_every == 0 or step == stop_at:
                if grad_norm is not None:
                    values["grad_norm"] = float(
                        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    )
                now = time.time()
                values["steps_per_s"] = (step - last_step) / max(1e-9, now - last_time)
                values.update({k: float(v) for k, v in metrics.items()})
                last_time, last_step = now, step
                log.log(step, values)
                result.history.append({"step": step, **values})
            log.progress(step, {"loss": values["loss"], "lr": values["lr"]})
            if step % cfg.checkpoint_every == 0 or step == stop_at:
                checkpoint_now()
            if step >= stop_at or micro_in_epoch >= micro_per_epoch:
                break

        if micro_in_epoch == micro_at_start:
            raise RuntimeError(
                f"the data stream yielded no batches in epoch {epoch} after {micro_in_epoch} of "
                f"{micro_per_epoch}; steps_per_epoch is larger than the data provides: lower it"
            )
        if step < stop_at and micro_in_epoch < micro_per_epoch:
            logger.warning("epoch %d ended after %d of %d batches", epoch, micro_in_epoch, micro_per_epoch)
            micro_in_epoch = micro_per_epoch  # a short stream ends the epoch; the schedule keeps its length
        seen, skipped = D.all_reduce_sum(epoch_images).tolist()
        result.skipped_images += int(skipped)
        if micro_in_epoch >= micro_per_epoch:
            log.line(f"epoch {epoch}: {int(seen)} images, {int(skipped)} unreadable images skipped")
            log.log(step, {"images": int(seen), "skipped_images": int(skipped)}, kind="epoch")
            if evaluate is not None and ((epoch + 1) % cfg.eval_every_epochs == 0 or step >= stop_at):
                wrapped.eval()
                with torch.no_grad():
                    eval_ctx = StepContext(epoch, step, 0, rank, cfg.seed, device)
                    eval_metrics = evaluate(wrapped, eval_ctx)
                    if ema is not None:
                        ema_metrics = evaluate(ema.module, eval_ctx)
                        eval_metrics.update({f"ema_{k}": v for k, v in ema_metrics.items()})
                wrapped.train()
                log.log(step, eval_metrics, kind="eval")
                log.line(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
                result.history.append({"step": step, "eval": eval_metrics})
    log.close()
    result.step = step
    return result


def _image_key(batch: dict[str, Any]) -> str:
    return "images" if "images" in batch else next(k for k, v in batch.items() if torch.is_tensor(v))


def _roll_back(folder: Path, model: nn.Module, optimizer, scaler, rollbacks: int, limit: int) -> None:
    found = list_checkpoints(folder)
    if not found:
        raise FloatingPointError("the loss keeps going non-finite and there is no checkpoint to roll back to")
    if rollbacks > limit:
        raise FloatingPointError(
            f"rolled back {limit} times and the loss still goes non-finite; lower the lr or use bf16/fp32"
        )
    extra = load_checkpoint(found[-1], model, optimizer)
    scaler.load_state_dict(extra["scaler"])
