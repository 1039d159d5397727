"""flyeva's one weights format: a folder with `model.safetensors` and `config.json`.

`config.json` holds `kind` (what the module is), `arch` (what rebuilds it, for that kind's builder)
and `source` (where the weights came from). `load(path)` returns the right module for any kind:
the kind's builder is looked up in `BUILDERS` by dotted name, so models never import tasks, and
the architecture is checked against the safetensors header before any weight is allocated.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 2  # 1: no `arch`, kind-specific keys; still read by `load`

# kind -> "module:function" taking the `arch` dict and returning an un-initialised module.
BUILDERS: dict[str, str] = {
    "mim": "flyeva.models.eva:mim_from_arch",
    "encoder": "flyeva.models.eva:encoder_from_arch",
    "classifier": "flyeva.tasks.classify.model:build_from_arch",
    "probe": "flyeva.tasks.classify.probe:build_from_arch",
    "clip": "flyeva.tasks.clip.model:build_from_arch",
    "detector": "flyeva.tasks.detect.model:build_from_arch",
    "segmenter": "flyeva.tasks.segment.model:build_from_arch",
    "video": "flyeva.tasks.video.model:build_from_arch",
    "teacher": "flyeva.teachers.clip:build_from_arch",
}
# Weights a kind may be built from while the file lacks them (e.g. an encoder read as `mim`).
MAY_BE_MISSING: dict[str, tuple[str, ...]] = {"mim": ("mask_token", "lm_head.")}


class WeightsError(ValueError):
    """A weights folder cannot be used; the message names the problem and the fix."""


def builder_for(kind: str) -> Callable[[dict[str, Any]], nn.Module]:
    if kind not in BUILDERS:
        raise WeightsError(f"unknown weights kind {kind!r}; flyeva knows {sorted(BUILDERS)}")
    module_name, function = BUILDERS[kind].split(":")
    return getattr(importlib.import_module(module_name), function)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries: a rename) to the disk, so power loss cannot undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(
    model: nn.Module | dict[str, torch.Tensor],
    folder: str | Path,
    *,
    kind: str,
    arch: dict[str, Any],
    source: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (or a state dict) as a flyeva weights folder; refuses non-finite weights. Each file
    is written to `.tmp`, fsynced and renamed, so a crash leaves the old file or the new one."""
    state = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightsError(
            f"refusing to write non-finite weights to {folder} ({len(bad)} tensors, e.g. {bad[0]})"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": "flyeva", "format_version": FORMAT_VERSION, "kind": kind, "arch": arch}
    config.update(source=source or {}, **(extra or {}))
    weights_tmp, config_tmp = folder / f"{WEIGHTS_FILE}.tmp", folder / f"{CONFIG_FILE}.tmp"
    try:
        save_file(state, str(weights_tmp), metadata={"format": "flyeva", "kind": kind})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(weights_tmp, 0o666 & ~umask)  # safetensors writes 0600; shared storage needs the umask's
        config_tmp.write_text(json.dumps(config, indent=2) + "\n")
        for tmp in (weights_tmp, config_tmp):
            fsync_path(tmp)
        os.replace(weights_tmp, folder / WEIGHTS_FILE)
        os.replace(config_tmp, folder / CONFIG_FILE)
        fsync_path(folder)
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
        raise WeightsError(
            f"could not write weights to {folder}: {reason}; free space there (or choose another "
            "train.output_dir) and run the same command again: it resumes from the last checkpoint"
        ) from None
    return folder


def is_weights_folder(path: str | Path) -> bool:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return (folder / CONFIG_FILE).is_file() and (path.is_dir() or path.name == WEIGHTS_FILE)


def read_config(path: str | Path) -> dict[str, Any]:
    """`config.json` of a weights folder (or of the folder of its `model.safetensors`)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise WeightsError(
            f"{folder} has no {CONFIG_FILE}; flyeva weights are a folder with {WEIGHTS_FILE} and "
            f"{CONFIG_FILE}. For a release checkpoint run `flyeva convert release FILE --out DIR` first"
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise WeightsError(f"{config_file} is not valid JSON ({error}); re-copy the folder") from error
    if not isinstance(config, dict) or "kind" not in config:
        raise WeightsError(f"{config_file} is not a flyeva weights config (no 'kind')")
    return config


def header_shapes(file: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{file} is truncated or corrupt ({error}); re-copy or re-download it") from error


def check_shapes(
    expected: dict[str, torch.Size | tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
    problem: str,
    may_be_missing: tuple[str, ...] = (),
    fix: str = "the folder's config.json and model.safetensors disagree; re-export the folder",
) -> None:
    """One error: `problem`, then every missing, unexpected and mis-shaped tensor, then `fix`."""
    missing = [k for k in expected if k not in found and not k.startswith(may_be_missing)]
    unexpected = [k for k in found if k not in expected]
    misshaped = [
        f"{k}: file {found[k]} vs model {tuple(v)}"
        for k, v in expected.items()
        if k in found and tuple(found[k]) != tuple(v)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{problem}:"]
        lines += [f"  missing: {k}" for k in missing[:20]]
        lines += [f"  unexpected: {k}" for k in unexpected[:20]]
        lines += [f"  mis-shaped: {k}" for k in misshaped[:20]]
        lines.append(fix)
        raise WeightsError("\n".join(lines))


def _arch_of_version_1(config: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Format-1 folders keep the architecture at the top level of config.json."""
    if config["kind"] == "classifier":
        return {"timm_kwargs": config["timm_kwargs"]}
    if "size" not in config:
        raise WeightsError(f"{folder / CONFIG_FILE} has no architecture ('arch' or 'size'); re-export it")
    return {key: config[key] for key in ("size", "teacher_dim") if key in config}


def load(path: str | Path, *, kind: str | None = None, map_location: str = "cpu") -> nn.Module:
    """The module a weights folder holds, of its own kind (or of `kind`, e.g. `encoder` from `mim`). The
    architecture is checked on the meta device against the file's header before any weight is allocated."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = read_config(folder)
    stored_kind, kind, arch = config["kind"], kind or config["kind"], config.get("arch")
    if arch is None:
        arch = _arch_of_version_1(config, folder)
    build = builder_for(kind)
    file = folder / WEIGHTS_FILE
    shapes = header_shapes(file)
    try:
        with torch.device("meta"):
            skeleton = build(arch)
    except (KeyError, TypeError, ValueError) as error:
        raise WeightsError(
            f"{folder / CONFIG_FILE}: its arch does not describe a {kind} ({type(error).__name__}: {error}); "
            "re-export the folder"
        ) from None
    expected = skeleton.state_dict()
    # A narrower kind (encoder from mim) takes the keys it has; extra keys in the file are fine then.
    found = shapes if kind == stored_kind else {k: v for k, v in shapes.items() if k in expected}
    problem = f"{folder} does not match its architecture"
    check_shapes({k: v.shape for k, v in expected.items()}, found, problem, MAY_BE_MISSING.get(kind, ()))
    del skeleton
    model = build(arch)
    state = {}
    with safe_open(str(file), framework="pt", device=map_location) as handle:
        for key in found:
            state[key] = handle.get_tensor(key)
            if state[key].is_floating_point() and not bool(torch.isfinite(state[key]).all()):
                raise WeightsError(
                    f"{file}: {key} holds NaN or Inf values; these are not trained weights (a diverged run's "
                    "folder?): use the weights of a run that finished"
                )
    target = model.state_dict()
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in state.items()}, strict=False)
    model.weights_config = config  # where it came from, for callers that want classes, pool, ...
    return model
