"""Training checkpoints: atomic, keep-last-K, weights-only loadable, sharded (DCP) under FSDP2.

A checkpoint is a plain dict of tensors and numbers: the model, the optimizer, one entry per stateful
part (the run's position, the loss scaler, the EMA weights) and every rank's RNG states, so an
interrupted run continues exactly. `Checkpointer` is the one writer and reader of that dict.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from flyeva.engine import distributed as D
from flyeva.models.weights import fsync_path

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{9})(\.pt)?$")


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers (weights_only-safe)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy"]["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy"]["pos"], 0, 0.0))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary `.tmp` names are never listed)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def _atomic_torch_save(obj: Any, path: Path) -> None:
    """Write, fsync, rename, fsync the folder: power loss leaves the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except (OSError, RuntimeError) as error:
        tmp.unlink(missing_ok=True)
        no_space = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
        reason = "the disk is full" if no_space else str(error).splitlines()[0]
        raise CheckpointWriteError(
            f"could not write checkpoint {path.name} in {path.parent}: {reason}; the previous checkpoint is "
            "kept. Free space there (or point train.output_dir elsewhere) and resume"
        ) from None


def _is_sharded(model: nn.Module) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def assert_finite(model: nn.Module) -> None:
    """Refuse to write NaN/Inf weights (docs/recipes.md §3, robustness)."""
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        if not torch.isfinite(local).all():
            raise FloatingPointError(f"parameter {name} is not finite; refusing to write a checkpoint")


class CheckpointReadError(ValueError):
    """A checkpoint cannot be read (truncated, corrupt, or pickled objects); the message names it."""


class CheckpointMismatchError(CheckpointReadError):
    """A readable checkpoint written for another model: resuming must stop, never start over."""


def read_training_checkpoint(path: Path) -> dict[str, Any]:
    """A `.pt` training checkpoint as a dict, without executing code; one clear error otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointReadError(
            f"{path} holds pickled Python objects, not a flyeva training checkpoint (loading it would run "
            "code); pass a checkpoint-*.pt that flyeva wrote, or train.resume=auto"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointReadError(f"{path} is truncated or corrupt ({str(error).splitlines()[0]})") from None


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class Checkpointer:
    """Writes and reads a run's training state: the model and optimizer, then each named stateful part
    under its name (as torchtitan's CheckpointManager keeps its `states`)."""

    folder: Path
    model: nn.Module
    optimizer: torch.optim.Optimizer
    parts: dict[str, Stateful]
    keep_last: int

    def list(self) -> list[Path]:
        return list_checkpoints(self.folder)

    def save(self, step: int) -> Path:
        """checkpoint-<step> with every part: one `.pt` (DDP/ZeRO-1) or a DCP folder (FSDP2); collective."""
        folder, model, optimizer = self.folder, self.model, self.optimizer
        extra = {name: part.state_dict() for name, part in self.parts.items()}
        assert_finite(model)
        folder.mkdir(parents=True, exist_ok=True)
        extra |= {"rng": D.all_gather_objects(rng_state()), "world_size": D.world_size()}
        name = f"checkpoint-{step:09d}"
        if _is_sharded(model):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            path, tmp = folder / name, folder / (name + ".tmp")
            if D.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
            D.barrier()
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            if D.is_main():
                torch.save(extra, tmp / "meta.pt")
                os.replace(tmp, path)
        else:
            if hasattr(optimizer, "consolidate_state_dict"):
                optimizer.consolidate_state_dict(to=0)  # ZeRO-1: gather the sharded optimizer state
            path = folder / f"{name}.pt"
            if D.is_main():
                state = {"model": D.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), **extra}
                _atomic_torch_save(state, path)
        D.barrier()
        if D.is_main():
            for old in self.list()[: -self.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        D.barrier()
        return path

    def _restore(self, path: Path) -> dict[str, Any]:
        """Restore model and optimizer in place; returns the rest (step, scaler, data position, rng)."""
        model, optimizer = self.model, self.optimizer
        if path.is_dir():
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

            model_state, optim_state = get_state_dict(model, optimizer)
            state = {"model": model_state, "optimizer": optim_state}
            dcp.load(state, checkpoint_id=str(path))
            set_state_dict(
                model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
            )
            return torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        state = read_training_checkpoint(path)
        if not isinstance(state, dict) or "model" not in state or "optimizer" not in state:
            raise CheckpointReadError(f"{path} is not a flyeva training checkpoint (no model/optimizer)")
        try:
            D.unwrap(model).load_state_dict(state.pop("model"))
        except RuntimeError as error:
            raise CheckpointMismatchError(
                f"{path} does not fit this model ({str(error).splitlines()[0]}); it was written by a run "
                "with another model: resume with that run's config or start a new train.output_dir"
            ) from None
        optimizer.load_state_dict(state.pop("optimizer"))
        return state

    def load(self, path: Path, only: tuple[str, ...] | None = None) -> None:
        """Restore the model, the optimizer and the parts named in `only` (all, and the RNG, if None)."""
        saved = self._restore(path)
        missing = [name for name in only or self.parts if name not in saved]
        if missing:
            raise CheckpointMismatchError(
                f"{path} holds no {', '.join(missing)} state; it was written by a run with other training "
                "settings (e.g. train.ema_decay): resume with that run's config or a new train.output_dir"
            )
        for name in only or self.parts:
            self.parts[name].load_state_dict(saved[name])
        rng = saved.get("rng", [])
        if only is None and len(rng) == D.world_size():  # the RNG only when the world size is unchanged
            set_rng_state(rng[D.rank()])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state on CPU, on every rank; collective under FSDP2."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # cpu_offload=True would hand the full state to rank 0 only; every rank needs it here.
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        return {k: v.detach().cpu() for k, v in state.items()}
    return {k: v.detach().cpu() for k, v in D.unwrap(model).state_dict().items()}
