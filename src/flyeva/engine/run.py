"""Run ownership: one output folder belongs to one run (docs/reliability.md).

`run.json` names the run (an id and the config that defines it). A second process on the same
folder is refused by an exclusive lock the OS releases when the holder dies (kill -9 included);
a new run on a folder that holds another run's checkpoints is refused unless `train.overwrite`;
a resume whose run-defining config differs is refused with every differing key listed.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flyeva.config import ConfigError
from flyeva.engine.stage import write_result

logger = logging.getLogger(__name__)

MANIFEST = "run.json"
LOCK = ".lock"
# Keys that may change between an interruption and its resume: how the run is watched and saved, not
# what it computes.
MAY_CHANGE_ON_RESUME = (
    "train.output_dir",
    "train.resume",
    "train.overwrite",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.checkpoint_every",
    "train.keep_last",
    "train.num_workers",
    "train.device",
    "train.cpu_malloc_tuning",
    "train.compile",
    "train.max_steps",
    "train.eval_every_epochs",
)


class RunLock:
    """An exclusive lock on OUTPUT/.lock holding the owner's PID; released on close or death."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.created = [p for p in (folder, *folder.parents) if not p.exists()]  # innermost first
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file of that name, a file above it, no permission
            raise ConfigError(
                f"cannot use {folder} as the output folder ({error.strerror}); set train.output_dir to a "
                "folder you can write"
            ) from None
        self.path = folder / LOCK
        self.handle = open(self.path, "a+")  # noqa: SIM115 (held for the whole run)
        try:
            # A POSIX record lock, not flock: forked DataLoader workers do not inherit it, so a killed
            # run frees the folder at once even while its orphaned workers are still exiting.
            fcntl.lockf(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise ConfigError(
                f"{folder} is in use by another flyeva run (PID {holder}); wait for it to finish, stop it, "
                "or set train.output_dir to another folder"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def release(self) -> None:
        """Unlock; a folder this lock created and nothing else wrote to (a start that failed) is removed."""
        if self.handle.closed:
            return
        empty = self.created and all(p.name == LOCK for p in self.folder.iterdir())
        if empty:
            self.path.unlink()  # while still held, so no other run has locked it
        fcntl.lockf(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        for folder in self.created if empty else ():
            try:
                folder.rmdir()
            except OSError:  # another writer came: keep it
                break

    @classmethod
    @contextmanager
    def hold(cls, folder: Path, enabled: bool = True) -> Iterator[None]:
        """Hold the folder's lock for the block; nested holds of one folder share the outer lock (a POSIX
        lock belongs to the process: a second lock of the same file would be released with the first)."""
        key = folder.resolve()
        if not enabled or key in _HELD:
            yield
            return
        _HELD[key] = cls(folder)
        try:
            yield
        finally:
            _HELD.pop(key).release()


_HELD: dict[Path, RunLock] = {}  # folders this process holds, by resolved path


def flatten(config: dict[str, Any], prefix: str = "", keep_empty: bool = False) -> dict[str, Any]:
    """Nested sections as dotted keys; `keep_empty` keeps an empty section as a value of its own."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and (value or not keep_empty):
            flat.update(flatten(value, f"{prefix}{key}.", keep_empty))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(run-defining differences, allowed differences) as 'key: saved -> current' lines."""
    old, new = flatten(saved), flatten(current)
    defining, allowed = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        line = f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        (allowed if key in MAY_CHANGE_ON_RESUME else defining).append(line)
    return defining, allowed


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is corrupt ({error}); delete it or use another train.output_dir") from None


def claim_folder(
    folder: Path, config: dict[str, Any], *, resume: str, overwrite: bool, has_checkpoints: bool
) -> dict[str, Any]:
    """The manifest of the run this process continues or starts in `folder` (rank 0 only)."""
    manifest = read_manifest(folder)
    if resume == "never" or manifest is None:
        if has_checkpoints and resume == "never":
            if not overwrite:
                owner = f"run {manifest['run_id']}" if manifest else "another run"
                raise ConfigError(
                    f"{folder} holds checkpoints of {owner}; train.resume=never would mix two runs in one "
                    "folder. Use another train.output_dir, or train.overwrite=true to delete them and start "
                    "over"
                )
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # retention must never mix runs
            logger.warning("train.overwrite=true: deleted the checkpoints of the previous run in %s", folder)
        elif has_checkpoints:
            logger.warning("%s has checkpoints but no %s: continuing them", folder, MANIFEST)
        manifest = {"run_id": uuid.uuid4().hex[:12], "config": config}
        write_result(folder, manifest, MANIFEST)
        return manifest
    defining, allowed = config_differences(manifest.get("config", {}), config)
    if defining and has_checkpoints:
        raise ConfigError(
            f"{folder} holds run {manifest['run_id']} with another config ({'; '.join(defining[:12])}); "
            "resume with the same settings, or start a new run with another train.output_dir (or "
            "train.resume=never train.overwrite=true to replace it)"
        )
    for line in allowed:
        logger.info("changed on resume: %s", line)
    manifest["config"] = config
    write_result(folder, manifest, MANIFEST)
    return manifest
