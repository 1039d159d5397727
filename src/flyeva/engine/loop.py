"""The one training loop every stage uses (the protocols of `flyeva.engine.stage`); it knows nothing of EVA.

Read it top to bottom: `train` = `setup_run` -> `resume_run` -> `train_one_epoch` (micro-steps,
then `optimizer_step`) and `run_evaluation` per epoch -> `finish_run`, in the spirit of MAE's
`train_one_epoch` and dinov2's `do_train`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flyeva.config import ConfigError, write_config
from flyeva.data.stream import build_loader
from flyeva.engine import distributed as D
from flyeva.engine.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CheckpointReadError,
    list_checkpoints,
)
from flyeva.engine.memory import keep_freed_memory
from flyeva.engine.metrics import MetricsLogger
from flyeva.engine.nonfinite import NonFiniteGuard, TrainingDiverged
from flyeva.engine.optim import (
    OptimConfig,
    adamw_flags,
    apply_lr,
    build_adamw,
    check_schedule,
    layer_decay_groups,
    lr_at,
    warmup_length,
    without_names,
)
from flyeva.engine.preemption import Interrupted, StopRequest, ignore_stop_signals
from flyeva.engine.run import RunLock, claim_folder
from flyeva.engine.scaler import HysteresisGradScaler, ShardedHysteresisGradScaler
from flyeva.engine.stage import Evaluator, Objective, as_evaluator, as_objective

logger = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How to run: batch, precision, distribution, checkpoints. Defaults: docs/recipes.md §3."""

    output_dir: str = "runs/pretrain"
    epochs: int = 150  # 0 = a run counted in optimizer steps: train.max_steps is the schedule's length
    steps_per_epoch: int = 0  # 0 = derive from the data; required for streaming sources
    batch_size: int = 32  # per rank per micro-step; the release ran 32 x 128 GPUs = 4096
    accum_steps: int = 1
    precision: str = "fp16"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    strategy: str = "zero1"  # ddp | zero1 (optimizer state sharded) | fsdp (FSDP2)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 8
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps
    keep_last: int = 3  # >= 1; older checkpoints of this run are deleted
    resume: str = "auto"  # auto (latest in output_dir) | never | a checkpoint path
    overwrite: bool = False  # with resume=never: delete another run's checkpoints in output_dir
    log_every: int = 10
    eval_every_epochs: int = 1
    max_consecutive_nonfinite: int = 5  # then roll back to the last checkpoint from before the streak
    max_rollbacks: int = 3
    # an epoch that could read at most this fraction of its samples stops the run (bad data, not noise)
    max_skipped_fraction: float = 0.5
    max_steps: int = 0  # stop after this many optimizer steps (0 = every epoch); see `epochs` = 0
    ema_decay: float = 0.0  # model EMA (0 = off); evaluation then also reports ema_* metrics
    fp16_init_scale: float = 65536.0  # docs/recipes.md §3: initial scale 2^16
    fp16_growth_interval: int = 500  # loss-scale window 500
    fp16_hysteresis: int = 2  # the 2nd overflow before the scale grows halves it
    fp16_min_scale: float = 1.0
    tensorboard: bool = True
    progress: bool = True
    # torch.compile (inductor) of the wrapped model, in place so names and checkpoints are unchanged;
    # fuses the elementwise work between GEMMs (docs/performance.md). The first steps compile.
    compile: bool = False
    # glibc keeps freed blocks instead of re-faulting them in every step (CPU only; docs/performance.md).
    cpu_malloc_tuning: bool = True

    def check(self) -> None:
        """Reject values that would fail later (or silently do something else), before any work."""
        positive = ("batch_size", "accum_steps", "checkpoint_every", "keep_last", "log_every")
        for name in (*positive, "eval_every_epochs", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.steps_per_epoch < 0 or self.max_steps < 0 or self.num_workers < 0 or self.max_rollbacks < 0:
            raise ConfigError("train.steps_per_epoch, max_steps, num_workers and max_rollbacks must be >= 0")
        if self.epochs < 0 or self.epochs == 0 == self.max_steps:
            raise ConfigError(
                f"train.epochs={self.epochs}: set epochs >= 1, or epochs=0 with train.max_steps >= 1 "
                "(a run counted in optimizer steps)"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.strategy not in D.STRATEGIES:
            raise ConfigError(f"train.strategy must be one of {list(D.STRATEGIES)}, got {self.strategy!r}")
        device = self.device.split(":")[0]
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={self.device} but this machine has no usable CUDA GPU; use auto or cpu"
            )
        if not 0.0 <= self.max_skipped_fraction < 1.0:
            fraction = self.max_skipped_fraction
            raise ConfigError(f"train.max_skipped_fraction must be in [0, 1), got {fraction}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


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
    run_id: str | None = None
    eval_epochs: list[int] = field(default_factory=list)  # the epoch of each evaluation in `history`


@dataclass
class RunState:
    """Everything `train` carries from step to step; one place to read what a run is."""

    cfg: TrainConfig
    optim_cfg: OptimConfig
    model: nn.Module  # as wrapped for the strategy (DDP, FSDP2) and maybe compiled
    base: nn.Module  # the plain module under the wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any
    ema: Any
    device: torch.device
    folder: Path
    run_id: str
    micro_per_epoch: int
    total_steps: int
    warmup_steps: int
    stop_at: int
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0
    skip: list[int] = field(default_factory=list)
    guard: NonFiniteGuard | None = None
    log: MetricsLogger | None = None
    result: TrainResult | None = None
    stop: StopRequest = field(default_factory=StopRequest)
    last_checkpoint: Path | None = None
    last_time: float = field(default_factory=time.time)
    last_step: int = 0
    interval_losses: list[float] = field(default_factory=list)  # since the last metrics record
    epoch_images: list[int] = field(default_factory=lambda: [0, 0])  # (seen, unreadable) on every rank
    checkpointer: Checkpointer | None = None

    def state_dict(self) -> dict[str, Any]:
        """The run's position, its stateful part of a checkpoint: the step and each data worker's place."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "skip": list(self.skip),
            "run_id": self.run_id,
            "epoch_images": list(self.epoch_images),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        workers = len(saved["skip"])
        if workers != len(self.skip) and saved["micro_in_epoch"] % self.micro_per_epoch:
            raise ConfigError(
                f"the checkpoint was written mid-epoch with train.num_workers={workers}; resume with the "
                "same num_workers so the data continues exactly (it may change at an epoch boundary)"
            )
        self.step, self.epoch, self.micro_in_epoch = saved["step"], saved["epoch"], saved["micro_in_epoch"]
        self.skip = list(saved["skip"]) if workers == len(self.skip) else [0] * len(self.skip)
        self.epoch_images = list(saved.get("epoch_images", [0, 0]))


# ---------------------------------------------------------------------------------------------------
# Setup: model placement, optimizer, scaler, EMA, schedule lengths, folder ownership.


def _zero1_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW with its state sharded over the ranks (ZeRO stage 1)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    first, *rest = without_names(groups)
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


def _make_scaler(cfg: TrainConfig, device: torch.device, sharded: bool) -> Any:
    fp16 = cfg.precision == "fp16"
    scaler = ShardedHysteresisGradScaler if sharded and fp16 else HysteresisGradScaler
    return scaler(
        device.type,
        init_scale=cfg.fp16_init_scale,
        growth_interval=cfg.fp16_growth_interval,
        hysteresis=cfg.fp16_hysteresis,
        min_scale=cfg.fp16_min_scale,
        enabled=fp16,
    )


def _schedule_lengths(stream: Any, cfg: TrainConfig, optim_cfg: OptimConfig) -> tuple[int, int, int]:
    """(micro-batches per epoch, total optimizer steps, warmup steps)."""
    micro_per_epoch = cfg.steps_per_epoch * cfg.accum_steps
    if not micro_per_epoch:
        batches = stream.num_batches(cfg.num_workers)
        if not batches:
            raise ConfigError("the data stream has no fixed length; set train.steps_per_epoch in the config")
        micro_per_epoch = batches // cfg.accum_steps * cfg.accum_steps
    steps_per_epoch = micro_per_epoch // cfg.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(
            f"an epoch has fewer batches than train.accum_steps={cfg.accum_steps}; "
            "use more data, a smaller batch or fewer accum_steps"
        )
    total = steps_per_epoch * cfg.epochs if cfg.epochs else cfg.max_steps
    return micro_per_epoch, total, warmup_length(optim_cfg, steps_per_epoch)


def _claim(
    folder: Path, cfg: TrainConfig, optim_cfg: OptimConfig, run_config: dict[str, Any], micro: int, total: int
) -> str:
    """This run's id; rank 0 takes the folder, the other ranks learn the id from it."""
    manifest = None
    if D.is_main():
        # What the run computes beyond its config: a data set that changed size changes the run.
        derived = {"micro_per_epoch": micro, "world_size": D.world_size()}
        # A step-counted run may be extended by raising max_steps unless its lr curve spans the whole run.
        if not cfg.epochs and optim_cfg.schedule in ("cosine", "poly"):
            derived["schedule_steps"] = total
        manifest = claim_folder(
            folder,
            {**run_config, "derived": derived},
            resume=cfg.resume,
            overwrite=cfg.overwrite,
            has_checkpoints=bool(list_checkpoints(folder / "checkpoints")),
        )
        write_config(run_config, folder)  # only once the run owns the folder
    return D.all_gather_objects(manifest["run_id"] if manifest else None)[0]


def setup_run(
    model: nn.Module,
    objective: Any,
    stream: Any,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    groups_fn: Callable[[nn.Module], list[dict]] | None,
    optimizer_fn: Callable[[list[dict], OptimConfig], torch.optim.Optimizer] | None,
    run_config: dict[str, Any],
) -> RunState:
    """Place the model, build optimizer/scaler/EMA, and take the output folder for this run."""
    check_schedule(optim_cfg)
    device = D.init_distributed(cfg.device)
    torch.manual_seed(cfg.seed + D.rank())  # drop path differs per rank, reproducibly
    folder = Path(cfg.output_dir)
    micro_per_epoch, total_steps, warmup_steps = _schedule_lengths(stream, cfg, optim_cfg)
    run_id = _claim(folder, cfg, optim_cfg, run_config, micro_per_epoch, total_steps)

    if device.type == "cpu" and cfg.cpu_malloc_tuning and keep_freed_memory():
        logger.info("train.cpu_malloc_tuning: glibc keeps freed memory for reuse (docs/performance.md)")
    wrapped = D.wrap_model(model, cfg.strategy, device)
    if cfg.compile:
        wrapped.compile()
    if isinstance(objective, nn.Module):
        objective.to(device)
    base = D.unwrap(wrapped)
    groups = groups_fn(base) if groups_fn else layer_decay_groups(base, optim_cfg)
    world = D.world_size()
    zero1 = cfg.strategy == "zero1" and world > 1
    if zero1 and optimizer_fn is not None:
        raise ConfigError("a custom optimizer cannot be sharded by ZeRO-1 here; use train.strategy=ddp")
    optimizer = _zero1_adamw(groups, optim_cfg) if zero1 else (optimizer_fn or build_adamw)(groups, optim_cfg)
    ema = None
    if cfg.ema_decay > 0:
        if cfg.strategy == "fsdp" and world > 1:
            raise ConfigError("train.ema_decay is not supported with strategy=fsdp; use ddp or zero1")
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(base, decay=cfg.ema_decay)
    state = RunState(
        cfg=cfg,
        optim_cfg=optim_cfg,
        model=wrapped,
        base=base,
        optimizer=optimizer,
        scaler=_make_scaler(cfg, device, cfg.strategy == "fsdp" and world > 1),
        ema=ema,
        device=device,
        folder=folder,
        run_id=run_id,
        micro_per_epoch=micro_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        stop_at=min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps,
        guard=NonFiniteGuard(cfg.max_consecutive_nonfinite, cfg.max_rollbacks),
        skip=[0] * max(1, cfg.num_workers),
    )
    parts = {"run": state, "scaler": state.scaler} | ({"ema": ema.module} if ema is not None else {})
    state.checkpointer = Checkpointer(folder / "checkpoints", wrapped, optimizer, parts, cfg.keep_last)
    return state


# ---------------------------------------------------------------------------------------------------
# Checkpoints: write, resume (falling back past a corrupt newest one), roll back.


def checkpoint_now(state: RunState) -> None:
    state.last_checkpoint = state.checkpointer.save(state.step)


def resume_run(state: RunState) -> None:
    """Continue from `train.resume` (a path) or this run's newest readable checkpoint (auto)."""
    cfg = state.cfg
    if cfg.resume == "never":
        return
    if cfg.resume != "auto" and not Path(cfg.resume).exists():
        raise ConfigError(f"train.resume={cfg.resume} does not exist; use resume=auto or a checkpoint path")
    candidates = state.checkpointer.list()[::-1] if cfg.resume == "auto" else [Path(cfg.resume)]
    unreadable = []
    for path in candidates:
        try:
            state.checkpointer.load(path)
            break
        except CheckpointMismatchError:
            raise  # another model's checkpoint: an error, never a fresh start over it
        except CheckpointReadError as error:
            if cfg.resume != "auto":
                raise
            unreadable.append(path.name)
            logger.warning("skipping unreadable checkpoint: %s; trying the previous one", error)
    else:
        if unreadable:
            raise ConfigError(
                f"no checkpoint in {state.checkpointer.folder} is readable ({', '.join(unreadable)}); move "
                "them away to start over, or train.resume=never train.overwrite=true to replace the run"
            )
        return  # no checkpoint yet: a fresh start
    logger.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)


def roll_back(state: RunState) -> None:
    """Weights, optimizer and scaler from the newest checkpoint known healthy; the data position goes on.

    No checkpoint is written during a streak. The one named by the guard's `streak_start` (if any) holds
    the weights that produced the first non-finite step: it is set aside as `*.nonfinite`, never restored.
    """
    guard = state.guard
    guard.start_rollback(str(state.checkpointer.folder))
    for suspect in state.checkpointer.list():
        if _step_of(suspect) >= guard.streak_start:  # its weights produced the first non-finite step
            suspect.rename(suspect.with_name(suspect.name + ".nonfinite"))
    healthy = state.checkpointer.list()
    if not healthy:
        raise guard.no_checkpoint_to_roll_back_to()
    state.checkpointer.load(healthy[-1], only=tuple(p for p in state.checkpointer.parts if p != "run"))
    state.log.line(f"step {state.step}: rolled back weights to {healthy[-1].name} ({guard.rollbacks})")
    guard.rolled_back()


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1].split(".")[0])


# ---------------------------------------------------------------------------------------------------
# The loop: micro-steps, the optimizer step, an epoch, evaluation.


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors anywhere in a batch (per-image target dicts and lists included) onto `device`."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    return value


def _sample_key(objective: Objective, batch: dict[str, Any]) -> str:
    """The batch entry with one row per sample: the objective's `input_key`, else the first tensor."""
    key = objective.input_key
    return key if key in batch else next(k for k, v in batch.items() if torch.is_tensor(v))


def _grad_norm(state: RunState) -> torch.Tensor:
    """The total gradient norm, clipped to optim.clip_grad when set (every precision checks it)."""
    parameters = [p for p in state.model.parameters() if p.grad is not None]
    if state.optim_cfg.clip_grad > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, state.optim_cfg.clip_grad)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def optimizer_step(state: RunState, nonfinite: float, samples: float) -> tuple[float | None, str | None]:
    """Apply the accumulated gradients, unless the loss or the gradient norm is non-finite or no rank
    had a readable sample (then AdamW's momentum and weight decay would move weights on no data).
    Returns (gradient norm, why the update was skipped)."""
    apply_lr(state.optimizer, lr_at(state.step, state.total_steps, state.warmup_steps, state.optim_cfg))
    grad_norm, skipped = None, None
    if nonfinite:
        skipped = f"non-finite loss on {int(nonfinite)} micro-batch(es)"
    elif samples:
        state.scaler.unscale_(state.optimizer)
        grad_norm = float(_grad_norm(state))
        if not math.isfinite(grad_norm) and state.cfg.precision != "fp16":
            skipped = f"non-finite gradient norm ({grad_norm})"
    if samples and not skipped:
        state.scaler.step(state.optimizer)  # fp16: skips by itself on overflow and lowers the scale
        state.scaler.update()
        if state.ema is not None:
            state.ema.update(state.base)  # constant decay from step 1 (timm warms it up when given a step)
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm, skipped


def end_step(state: RunState, accumulated: torch.Tensor, metrics: dict[str, Any]) -> None:
    """One optimizer step and its bookkeeping: the non-finite guard, the log, a stop, the checkpoint."""
    cfg, log = state.cfg, state.log
    loss_sum, nonfinite, stop, samples, unreadable = D.all_reduce_sum(accumulated).tolist()
    accumulated.zero_()
    state.epoch_images = [state.epoch_images[0] + int(samples), state.epoch_images[1] + int(unreadable)]
    if not samples:
        log.line(f"step {state.step}: every sample of the step was unreadable, update skipped")
        nonfinite = 0.0  # no data is not a non-finite step
    grad_norm, skipped = optimizer_step(state, nonfinite, samples)
    if skipped:
        state.result.nonfinite_steps += 1
        log.line(f"step {state.step}: {skipped}, update skipped")
    if samples and state.guard.record(state.step, skipped is not None):
        roll_back(state)
    state.step += 1
    _log_step(state, loss_sum, grad_norm, metrics, skipped is not None)
    if stop:
        state.stop.signum = state.stop.signum or 15  # another rank was signalled: stop here too
    due = state.step % cfg.checkpoint_every == 0 or state.step == state.stop_at or state.stop.requested
    if due and state.guard.healthy:  # never checkpoint weights that just produced a non-finite step
        checkpoint_now(state)


def _log_step(state: RunState, loss_sum: float, grad_norm, metrics, skipped: bool) -> None:
    cfg, step = state.cfg, state.step
    loss = None if skipped else loss_sum / (D.world_size() * cfg.accum_steps)
    if loss is not None:
        state.interval_losses.append(loss)
    values: dict[str, Any] = {
        # A skipped step has no loss: null in metrics.jsonl, never 0.0.
        "loss": loss,
        "lr": state.optimizer.param_groups[0]["lr"] / state.optimizer.param_groups[0].get("lr_scale", 1.0),
        "epoch": state.epoch,
    }
    if skipped:
        values["skipped"] = True
    if cfg.precision == "fp16":
        values["loss_scale"] = state.scaler.get_scale()
    if step % cfg.log_every == 0 or step == state.stop_at:
        if grad_norm is not None:
            values["grad_norm"] = grad_norm
        now = time.time()
        values["steps_per_s"] = (step - state.last_step) / max(1e-9, now - state.last_time)
        values.update({k: float(v) for k, v in metrics.items()})
        # The record's loss is the mean since the last record: one batch every log_every steps is noise.
        losses, state.interval_losses = state.interval_losses, []
        values["loss"] = sum(losses) / len(losses) if losses and not skipped else None
        state.last_time, state.last_step = now, step
        state.log.log(step, values)
        state.result.history.append({"step": step, **values})
    state.log.progress(step, values)


def train_one_epoch(state: RunState, objective: Objective, stream: Any) -> None:
    """Micro-steps until the epoch ends, the run ends, or a stop is requested."""
    cfg = state.cfg
    stream.set_epoch(state.epoch, state.skip)
    # A private generator: DataLoader would otherwise draw from the global RNG (drop path's) per epoch.
    loader = build_loader(stream, cfg.num_workers, seed=cfg.seed, worker_init_fn=ignore_stop_signals)
    # loss sum, non-finite micro-batches, stop, samples, unreadable samples
    accumulated = torch.zeros(5, dtype=torch.float64, device=state.device)
    autocast = PRECISIONS[cfg.precision]

    def backward(loss: torch.Tensor) -> None:
        state.scaler.scale(loss / cfg.accum_steps).backward()

    for batch in loader:
        state.skip[batch["worker"]] = batch["index"] + 1
        samples = len(batch[_sample_key(objective, batch)])
        unreadable = batch.get("num_skipped", 0)
        batch = _to_device(batch, state.device)
        micro = state.micro_in_epoch % cfg.accum_steps
        ctx = StepContext(state.epoch, state.step, micro, D.rank(), cfg.seed, state.device, backward)
        last_micro = micro == cfg.accum_steps - 1
        with D.grad_sync_context(state.model, last_micro):
            with torch.autocast(state.device.type, dtype=autocast, enabled=autocast is not None):
                loss, metrics = objective(state.model, batch, ctx)
            if not objective.handles_backward:
                backward(loss)
        # Kept on the device: no host sync per micro-step, one all-reduce per optimizer step.
        detached = loss.detach().double()
        finite = torch.isfinite(detached)
        zero = detached.new_zeros(())
        accumulated += torch.stack(
            [detached.where(finite, 0.0), (~finite).double(), zero, zero + samples, zero + unreadable]
        )
        state.micro_in_epoch += 1
        if not last_micro:
            continue
        accumulated[2] = float(state.stop.requested)
        end_step(state, accumulated, metrics)
        if (
            state.step >= state.stop_at
            or state.micro_in_epoch >= state.micro_per_epoch
            or state.stop.requested
        ):
            break
    del loader  # shuts the workers down now, not at garbage collection


def run_evaluation(state: RunState, evaluate: Evaluator) -> None:
    state.model.eval()
    with torch.no_grad():
        ctx = StepContext(state.epoch, state.step, 0, D.rank(), state.cfg.seed, state.device)
        metrics = evaluate(state.model, ctx)
        if state.ema is not None:
            metrics.update({f"ema_{k}": v for k, v in evaluate(state.ema.module, ctx).items()})
    state.model.train()
    state.log.log(state.step, metrics, kind="eval", epoch=state.epoch)
    state.log.line(f"epoch {state.epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    state.result.history.append({"step": state.step, "eval": metrics})
    state.result.eval_epochs.append(state.epoch)


def _restore_history(result: TrainResult, records: list[dict[str, Any]]) -> None:
    """A resumed run's result keeps what it logged before the checkpoint: evaluations, unreadable counts."""
    for record in records:
        if record.get("kind") == "eval":
            metrics = {k: v for k, v in record.items() if k not in ("kind", "step", "epoch", "time")}
            result.history.append({"step": record["step"], "eval": metrics})
            result.eval_epochs.append(record.get("epoch"))
        elif record.get("kind") == "epoch":
            result.skipped_images += int(record.get("skipped_images", 0))


def _evaluated_at(state: RunState) -> int | None:
    return next((h["step"] for h in reversed(state.result.history) if "eval" in h), None)


def _end_epoch(state: RunState, micro_at_start: int, evaluate: Evaluator | None):
    cfg = state.cfg
    if state.micro_in_epoch == micro_at_start:
        raise ConfigError(
            f"the data stream yielded no batches in epoch {state.epoch} after {state.micro_in_epoch} of "
            f"{state.micro_per_epoch}; steps_per_epoch is larger than the data provides: lower it"
        )
    if state.step < state.stop_at and state.micro_in_epoch < state.micro_per_epoch:
        logger.warning(
            "epoch %d ended after %d of %d batches", state.epoch, state.micro_in_epoch, state.micro_per_epoch
        )
        state.micro_in_epoch = (
            state.micro_per_epoch
        )  # a short stream ends the epoch; the schedule keeps its length
    seen, skipped = state.epoch_images
    state.result.skipped_images += int(skipped)
    if skipped > cfg.max_skipped_fraction * (seen + skipped):
        raise ConfigError(
            f"epoch {state.epoch}: {int(skipped)} of {int(seen + skipped)} training samples were unreadable "
            f"(more than train.max_skipped_fraction={cfg.max_skipped_fraction}); the warnings above name "
            "them. Fix or remove them; no weights were written"
        )
    if state.micro_in_epoch >= state.micro_per_epoch:
        state.log.line(f"epoch {state.epoch}: {int(seen)} images, {int(skipped)} unreadable images skipped")
        state.log.log(state.step, {"images": int(seen), "skipped_images": int(skipped)}, kind="epoch")
        last = (state.epoch + 1) % cfg.eval_every_epochs == 0 or state.step >= state.stop_at
        if evaluate is not None and last:
            run_evaluation(state, evaluate)


def finish_run(state: RunState) -> None:
    """Refuse to hand back weights that a non-finite step left behind (final/ is never written then)."""
    state.guard.check_end()
    for name, param in state.model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not bool(torch.isfinite(local).all()):
            raise TrainingDiverged(
                f"parameter {name} is not finite at the end of training; weights not written"
            )


def _stop(state: RunState) -> Interrupted:
    """A signal stopped the run: checkpoint the current step unless one holds it (e.g. a signal that came
    during an evaluation, after the step's own checkpoint decision), then say how to resume."""
    written = state.last_checkpoint is not None and _step_of(state.last_checkpoint) == state.step
    if not written and state.guard.healthy and state.step > 0:
        checkpoint_now(state)
    where = f"checkpoint {state.last_checkpoint} written" if state.last_checkpoint else "no checkpoint"
    return Interrupted(
        state.stop.signum,
        f"stopped by a signal at step {state.step}; {where}; run the same command again to resume",
    )


def train(
    model: nn.Module,
    objective: Objective | Callable[[nn.Module, dict[str, Any], StepContext], tuple[torch.Tensor, dict]],
    stream: Any,
    cfg: TrainConfig,
    optim_cfg: OptimConfig,
    *,
    run_config: dict[str, Any],
    groups_fn: Callable[[nn.Module], list[dict]] | None = None,
    evaluate: Evaluator | Callable[[nn.Module, StepContext], dict[str, float]] | None = None,
    optimizer_fn: Callable[[list[dict], OptimConfig], torch.optim.Optimizer] | None = None,
) -> TrainResult:
    """Train `model` on `stream` with `objective`; resumable, distributed, mixed precision.

    `run_config` is the stage's whole resolved config: config.yaml records it, and a resume refuses
    when a run-defining key of it changed (docs/reliability.md). `evaluate` runs after every
    `eval_every_epochs` epochs and at the last step. `optimizer_fn(groups, optim_cfg)` replaces AdamW
    (e.g. LARS for linear probes); the engine still sets every group's lr (times its `lr_scale`).
    """
    cfg.check()
    objective, evaluate = as_objective(objective), as_evaluator(evaluate)
    D.init_distributed(cfg.device)  # before the lock: only rank 0 of a torchrun job takes it
    with RunLock.hold(Path(cfg.output_dir), enabled=D.is_main()):
        state = setup_run(model, objective, stream, cfg, optim_cfg, groups_fn, optimizer_fn, run_config)
        resume_run(state)
        state.log = MetricsLogger(
            state.folder,
            enabled=D.is_main(),
            tensorboard=cfg.tensorboard,
            progress=cfg.progress,
            total_steps=state.stop_at,
            start_step=state.step,
            log_every=cfg.log_every,
            images_per_step=cfg.batch_size * cfg.accum_steps * D.world_size(),
            name="/".join(state.folder.parts[-2:]),
        )
        resumed = f", resumed at step {state.step}" if state.step else ""
        state.log.line(f"training steps 1-{state.stop_at} into {state.folder}{resumed}")
        state.result = TrainResult(
            model=state.model, step=state.step, ema_model=state.ema and state.ema.module, run_id=state.run_id
        )
        _restore_history(state.result, state.log.earlier)
        state.last_step = state.step
        state.model.train()
        with state.stop:
            while state.step < state.stop_at and not state.stop.requested:
                if state.micro_in_epoch >= state.micro_per_epoch:
                    state.epoch, state.micro_in_epoch, state.skip = state.epoch + 1, 0, [0] * len(state.skip)
                    state.epoch_images = [0, 0]
                micro_at_start = state.micro_in_epoch
                train_one_epoch(state, objective, stream)
                if state.stop.requested:
                    break
                _end_epoch(state, micro_at_start, evaluate)
            if evaluate is not None and not state.stop.requested and _evaluated_at(state) != state.step:
                run_evaluation(state, evaluate)  # every run ends with an evaluation of its last step
        state.log.close()
        if state.stop.requested:
            raise _stop(state)
        finish_run(state)
        state.result.step = state.step
        return state.result
