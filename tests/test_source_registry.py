"""Data-source kinds are a registry (docs/data.md): a kind declares its keys, its targets and its epoch
order in its own module, and `build_source` / `ImageBatchStream` need nothing else to read it."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from flyeva.config import ConfigError
from flyeva.data.sources import (
    KINDS,
    SOURCE_KEYS,
    SourceConfig,
    build_source,
    build_sources,
    register,
)
from flyeva.data.stream import ImageBatchStream, PendingSample, build_loader


def tiny(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)


class GreySource:
    """A toy indexable kind: image i is a 2x2 grey square of value i; its label is i % 3."""

    target_type = int

    def __init__(self, num_samples: int, with_labels: bool):
        self.num_samples, self.classes = num_samples, ["zero", "one", "two"] if with_labels else None

    def __len__(self) -> int:
        return self.num_samples

    def key(self, index: int) -> str:
        return f"grey-{index}"

    def load(self, index: int, max_pixels: int | None = None) -> Image.Image:
        return Image.new("RGB", (2, 2), (index, index, index))

    def target(self, index: int) -> int:
        return index % 3


class CountdownSource:
    """A toy streaming kind: worker slot s of n reads values s, s + n, s + 2n, ... below `num_samples`."""

    target_type = None

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def samples(self, stream: ImageBatchStream, worker: int, num_workers: int, wrap: bool) -> Iterator:
        slot, slots = stream.rank * num_workers + worker, stream.world_size * num_workers
        for value in range(slot, self.num_samples, slots):
            load = functools.partial(Image.new, "RGB", (1, 1), (value, 0, 0))
            yield PendingSample(f"count-{value}", value, 0, 0, load, None)


def build_grey(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> GreySource:
    return GreySource(config.num_samples, with_labels=target == "label")


def build_countdown(config: SourceConfig, target: str | None, allow_empty_classes: bool) -> CountdownSource:
    return CountdownSource(config.num_samples)


@pytest.fixture
def toy_kinds():
    register("grey", keys=("num_samples",), targets=("label",))(build_grey)
    register("countdown", keys=("num_samples",), streams=True)(build_countdown)
    yield
    for name in ("grey", "countdown"):
        KINDS.pop(name), SOURCE_KEYS.pop(name)


def read(stream: ImageBatchStream, num_workers: int = 0) -> list[dict]:
    return list(build_loader(stream, num_workers))


def test_a_kind_registered_in_its_own_module_is_read_end_to_end(toy_kinds):
    assert SOURCE_KEYS["grey"] == ("num_samples",) and "countdown" in SOURCE_KEYS
    source = build_source({"type": "grey", "num_samples": 10}, target="label")
    stream = ImageBatchStream(source, tiny, batch_size=4, seed=1, return_ids=True)
    batches = read(stream, num_workers=2)
    assert stream.classes == ["zero", "one", "two"] and [len(b["ids"]) for b in batches] == [4, 4, 2]
    ids = [i for batch in batches for i in batch["ids"].tolist()]
    assert sorted(ids) == list(range(10)) and ids != list(range(10))  # shuffled by the stream
    for batch in batches:
        assert batch["labels"].tolist() == [i % 3 for i in batch["ids"].tolist()]
        assert batch["images"][:, 0, 0, 0].tolist() == batch["ids"].tolist()

    streamed = build_source(SourceConfig(type="countdown", num_samples=12))
    ranks = [ImageBatchStream(streamed, tiny, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    values = [int(v) for stream in ranks for b in read(stream) for v in b["images"][:, 0, 0, 0].tolist()]
    assert sorted(values) == list(range(12))  # each (rank, worker) slot read its own share once
    mixed = build_sources([{"type": "grey", "num_samples": 5}, {"type": "countdown", "num_samples": 50}], 8)
    assert sum(len(b["images"]) for b in read(ImageBatchStream(mixed, tiny, batch_size=4))) == 8


def test_a_kind_declares_which_keys_and_targets_apply(toy_kinds):
    with pytest.raises(
        ConfigError, match=r"data source key 'path' does not apply to a 'grey' source; .* num_samples, weight"
    ):
        build_source({"type": "grey", "num_samples": 3, "path": "x"})
    with pytest.raises(ConfigError, match=r"a 'countdown' source has no labels; this stage reads \[.*'grey'"):
        build_source({"type": "countdown", "num_samples": 3}, target="label")
    with pytest.raises(ConfigError, match="a 'grey' data source needs 'num_samples'"):
        build_source({"type": "grey"})
    with pytest.raises(ValueError, match="'grey' is already registered"):
        register("grey", keys=("num_samples",))(build_grey)
    with pytest.raises(ValueError, match=r"keys \(.colour.,\) must be SourceConfig fields"):
        register("odd", keys=("colour",))(build_grey)
    register("liar", keys=("num_samples",), streams=True)(build_grey)
    try:
        with pytest.raises(TypeError, match="declares a streamed order but built"):
            build_source({"type": "liar", "num_samples": 3})
    finally:
        KINDS.pop("liar"), SOURCE_KEYS.pop("liar")


def test_every_shipped_kind_is_registered_with_its_keys():
    assert {name: SOURCE_KEYS[name] for name in ("folder", "wds", "shapeworld", "cifar100")} == {
        "folder": ("path",),
        "wds": ("path", "num_samples", "target"),
        "shapeworld": ("num_samples", "image_size", "seed"),
        "cifar100": ("path", "split"),
    }
    assert [name for name, kind in KINDS.items() if kind.streams] == ["wds"]
    assert sorted(name for name, kind in KINDS.items() if "caption" in kind.targets) == [
        "caption_folder",
        "captions",
        "shapeworld",
        "wds",
    ]
