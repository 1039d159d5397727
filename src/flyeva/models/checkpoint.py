"""Reading and writing encoder weights: the release's formats, flyeva's own, and timm's (key maps:
`flyeva.models.convert`). Nothing here executes code from a file (safetensors or weights_only)."""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from flyeva.models.convert import MIM_ONLY_KEYS, flyeva_to_timm, infer_size, release_to_flyeva
from flyeva.models.eva import (
    EVA_SIZES,
    TEACHER_DIM,
    TIMM_EQUIVALENTS,
    EvaForMIM,
    build_encoder,
    build_mim_model,
    size_arch,
)
from flyeva.models.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WeightsError,
    check_shapes,
    is_weights_folder,
    load,
    read_config,
    save_weights,
)

logger = logging.getLogger(__name__)

FLYEVA_WEIGHTS, FLYEVA_CONFIG = WEIGHTS_FILE, CONFIG_FILE
CheckpointError = WeightsError  # one error type for every weights file that cannot be used


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False, pickle_fix: str = "") -> dict[str, Any]:
    """Load a checkpoint's top-level dict without executing code, unless `trust_pickle` (`flyeva convert
    release --trust-pickle`); `pickle_fix` replaces the advice given when a file needs code to unpickle."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); re-copy or re-download it")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"checkpoint {path} is truncated or corrupt ({error}); re-copy or re-download it"
            ) from error
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive, which flyeva never loads implicitly (it runs code). "
            "If it is an OpenAI CLIP file, convert it once with "
            f"`flyeva convert teacher --openai-torchscript {path} --out {path.with_suffix('')}`"
        )
    try:
        # argparse.Namespace is plain data; the release stores its training args beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        fix = pickle_fix or (
            f"If you trust the file, convert it once with `flyeva convert release {path} --out DIR "
            "--trust-pickle`; flyeva then loads DIR safely."
        )
        raise CheckpointError(
            f"{path} holds pickled Python objects beyond tensors, so torch.load(weights_only=True) refuses "
            f"it (loading them would run code). {fix}"
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({str(error).splitlines()[0]}); "
            "re-copy or re-download it"
        ) from error


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(re.match(r"^[^/]+/(code/|constants\.pkl$)", name) for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def extract_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a release checkpoint: under `model`, `module`, `model_ema`, or top level."""
    for key in ("model", "module", "model_ema", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    tensors = {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(
            f"no tensors found in the checkpoint (top-level keys: {sorted(checkpoint)[:10]}); "
            "expected a state dict at the top level or under 'model', 'module' or 'model_ema'"
        )
    return tensors


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], *, ignore_missing: tuple[str, ...] = ()
) -> None:
    """Strict load that casts dtypes (fp16 -> fp32) and lists every mismatch in one error."""
    expected = model.state_dict()
    check_shapes(
        {k: v.shape for k, v in expected.items()},
        {k: tuple(v.shape) for k, v in state_dict.items()},
        "checkpoint does not match the model",
        ignore_missing,
        fix="check the model size (--size / config.json) or convert the file with `flyeva convert`",
    )
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise WeightsError(f"the checkpoint's {broken[0]} holds NaN or Inf values: not trained weights")
    cast = {k: v.to(expected[k].dtype) for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=not ignore_missing)


def load_release_checkpoint(
    path: str | Path, *, kind: str = "mim", num_heads: int | None = None, trust_pickle: bool = False
) -> nn.Module:
    """Build a flyeva model (`kind` = "mim" or "encoder") from a release checkpoint file."""
    raw = extract_state_dict(read_checkpoint(path, trust_pickle=trust_pickle))
    state_dict, notes = release_to_flyeva(raw)
    if notes.dropped:
        logger.info("dropped %d release keys: %s", len(notes.dropped), ", ".join(notes.dropped[:8]))
    size = infer_size(state_dict, num_heads)
    if kind == "mim":
        teacher_dim = state_dict["lm_head.weight"].shape[0] if "lm_head.weight" in state_dict else TEACHER_DIM
        model = build_mim_model(size, teacher_dim=teacher_dim, release_init=False, drop_path_rate=0.0)
        # Fine-tuned and CLIP checkpoints have no MIM head: those parts keep their fresh init.
        load_weights(model, state_dict, ignore_missing=MIM_ONLY_KEYS)
    elif kind == "encoder":
        model = build_encoder(size, release_init=False)
        load_weights(model, {k: v for k, v in state_dict.items() if k not in MIM_ONLY_KEYS})
    else:
        raise ValueError(f"kind must be 'mim' or 'encoder', got {kind!r}")
    return model


def model_config(model: nn.Module) -> dict[str, Any]:
    """Kind and architecture of an encoder or MIM model (what its weights folder records)."""
    return {"kind": "mim" if isinstance(model, EvaForMIM) else "encoder", **size_arch(model)}


def save_flyeva(model: nn.Module, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write an encoder or MIM model as a flyeva weights folder (models/weights.py)."""
    return save_weights(model, out_dir, kind=model_config(model)["kind"], arch=size_arch(model), extra=extra)


def load_flyeva(path: str | Path, *, kind: str | None = None) -> nn.Module:
    """An encoder or MIM model from a flyeva weights folder (or its `model.safetensors`)."""
    if kind not in (None, "mim", "encoder"):
        raise ValueError(f"kind must be 'mim' or 'encoder', got {kind!r}")
    stored = read_config(path)["kind"]
    if stored not in ("mim", "encoder"):
        raise CheckpointError(f"{path} holds a {stored}, not an EVA encoder; pass a `flyeva pretrain` folder")
    return load(path, kind=kind)


def read_encoder_state(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Weights of a flyeva folder or a release checkpoint under flyeva's encoder/MIM names (classifier
    heads and CLIP projections dropped, `mask_token` and `lm_head.*` kept when present)."""
    path = Path(path)
    if is_weights_folder(path):
        state = read_checkpoint((path if path.is_dir() else path.parent) / FLYEVA_WEIGHTS)
    else:
        state = extract_state_dict(read_checkpoint(path, trust_pickle=trust_pickle))
    return release_to_flyeva(state)[0]


def load_any(path: str | Path, *, kind: str | None = None, trust_pickle: bool = False) -> nn.Module:
    """A flyeva folder, or a release checkpoint file (converted on the fly)."""
    if is_weights_folder(path):
        return load_flyeva(path, kind=kind)
    return load_release_checkpoint(path, kind=kind or "mim", trust_pickle=trust_pickle)


def export_release(model: nn.Module, path: str | Path) -> Path:
    """The release's own layout: `{"model": state_dict}` in a torch file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def export_timm(model: nn.Module, path: str | Path) -> Path:
    """Write a safetensors file that timm loads with `pretrained_cfg_overlay=dict(file=path)`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flyeva_to_timm(model.state_dict()), str(path))
    return path


def named_size(model: nn.Module) -> str | None:
    """The registry name of the model's architecture, if it has one."""
    size = size_arch(model)["size"]
    return next((name for name, known in EVA_SIZES.items() if known.__dict__ == size), None)


def timm_recipe(size_name: str | None, path: str | Path) -> str:
    """The one line that loads an exported file in timm."""
    timm_name = TIMM_EQUIVALENTS.get(size_name or "")
    if timm_name is None:
        return (
            f"timm has no EVA-01 model at size {size_name!r}; build it with "
            "`timm.models.eva.Eva(**kwargs)` and "
            f"`load_state_dict(safetensors.torch.load_file({str(path)!r}))`"
        )
    return (
        f'timm.create_model("{timm_name}", pretrained=True, num_classes=0, '
        f'pretrained_cfg_overlay=dict(file="{path}"))'
    )
