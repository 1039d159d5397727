"""`type: cifar10` and `type: cifar100`: CIFAR's python version, unpickled without executing code."""

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flyeva.data.sources import SourceConfig, register

# CIFAR's python version: meta file, class-name key, label key, train batches, test batches.
CIFAR = {
    "cifar10": (
        "batches.meta",
        "label_names",
        "labels",
        [f"data_batch_{i}" for i in "12345"],
        ["test_batch"],
    ),
    "cifar100": ("meta", "fine_label_names", "fine_labels", ["train"], ["test"]),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays: CIFAR's pickles need only numpy's
    array reconstruction, so any other global they name (os.system, ...) is refused, not executed."""

    def __init__(self, file: Any, source: str):
        super().__init__(file, encoding="latin1")  # CIFAR's pickles were written by Python 2
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy.(_)core.multiarray._reconstruct
        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
        }
        if (module, name) in allowed:
            return allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self.source} asks to load {module}.{name}, which a CIFAR pickle never needs; refusing it "
            "(unpickling it could run code). Re-download CIFAR's python version from its original site"
        )


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, Any]:
    """One CIFAR python-version pickle (a dict), read without executing code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist; pass the extracted cifar-*-python folder")
    try:
        with open(path, "rb") as file:
            data = _NumpyOnlyUnpickler(file, str(path)).load()
    except pickle.UnpicklingError as error:  # the refusal above, or a file that is not a pickle at all
        raise ValueError(str(error).splitlines()[0]) from None
    except (EOFError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is truncated or not a CIFAR pickle ({error}); re-download it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a CIFAR batch dict")
    return data


class CifarSource:
    """CIFAR-10/100's python version (CIFAR-100: fine labels), held in memory as one uint8 array."""

    target_type = int

    def __init__(self, root: str | os.PathLike, kind: str, split: str):
        if split not in ("train", "test"):
            raise ValueError(f"a {kind} source needs split: train or test, got {split!r}")
        self.root, self.kind, self.split = Path(root), kind, split
        meta, names_key, label_key, train_files, test_files = CIFAR[kind]
        self.classes = [str(name) for name in read_cifar_pickle(self.root / meta)[names_key]]
        files = train_files if split == "train" else test_files
        batches = [read_cifar_pickle(self.root / file) for file in files]
        self.targets = [int(label) for batch in batches for label in batch[label_key]]
        # Each row is 1024 red, 1024 green, 1024 blue values, each row-major over 32 x 32.
        rows = np.concatenate([np.asarray(batch["data"], dtype=np.uint8) for batch in batches])
        self.pixels = rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    def __len__(self) -> int:
        return len(self.targets)

    def key(self, index: int) -> str:
        return f"{self.kind}-{self.split}-{index:05d}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        return Image.fromarray(self.pixels[index])

    def target(self, index: int) -> int:
        return self.targets[index]


@register(*CIFAR, keys=("path", "split"), targets=("label",))
def build(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> CifarSource:
    return CifarSource(config.path, config.type, config.split)
