"""Image sources, with optional targets: class labels (fine-tuning) or captions (EVA-CLIP); docs/data.md.

Each `type` is a module of this package that registers its builder (`register`); `SourceConfig` is
the one schema they share (OmegaConf needs a fixed one). Indexable sources give `len`, `key(i)`,
`load(i, max_pixels)` and `target(i)`; streaming ones (wds, `MixtureSource`) give `num_samples` and
`samples(stream, worker, num_workers, wrap)`. `target_type` is `int` (labels), `str` (captions) or
None; an unreadable image or target raises `UnreadableImageError` / `UnreadableTargetError`.
"""

# ruff: noqa: E402, F401  (the names other modules import from here, bound after the kinds register)
from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from flyeva.config import ConfigError
from flyeva.data.sources.base import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ConcatSource,
    MixtureSource,
    SourceSubset,
    UnreadableImageError,
    UnreadableTargetError,
    decode_rgb,
    find_images,
    input_images,
    is_indexable,
    read_lines,
)

TARGETS = ("label", "caption")  # what a stage may ask a source for (None: images only)


@dataclass
class SourceConfig:
    """One data source, as every stage's config lists them (`data.sources: [...]`, docs/data.md); the
    stage, not the config, decides the target, and keys outside the type's `SOURCE_KEYS` stay at default."""

    type: str = "folder"  # a registered kind: folder | imagenet | list | cifar10 | wds | captions | ...
    path: str = ""  # folder, list file, webdataset shard pattern, or caption table
    weight: float = 1.0  # relative sampling weight inside a mixture (every kind)
    num_samples: int = 0  # wds: samples per epoch (optional); generated kinds: the data set size
    seed: int = 0  # generated kinds
    image_size: int = 0  # generated kinds (0 = 64)
    root: str = ""  # the folder relative paths start from
    target: str = ""  # wds: the member holding the target ("" = cls for labels, txt for captions)
    check_files: bool = True  # list: check every listed file exists up front
    path_column: str = ""  # captions ("" = open_clip's "filepath")
    caption_column: str = ""  # captions ("" = open_clip's "title")
    sep: str = ""  # captions ("" = from the extension: .tsv tab, .csv comma)
    subset: str = ""  # imagenet: a file of wnids/indices the set covers ("" = its folders)
    class_map: str = ""  # imagenet: "folder<TAB>wnid|index" lines for folders not named by wnid/index
    split: str = ""  # cifar10 / cifar100: train | test


Builder = Callable[[SourceConfig, "str | None", bool], Any]  # (config, target, allow_empty_classes) -> source
Keys = tuple[str, ...]


@dataclass(frozen=True)
class SourceKind:
    """A `type` of data source: what it reads and gives, and how to build it (see `register`)."""

    name: str
    keys: Keys  # the SourceConfig keys it reads besides type and weight; it cannot do without the first
    targets: Keys  # the targets it can give (of TARGETS)
    streams: bool  # epoch order: True = streamed (`samples(...)`), False = indexable, shuffled by the stream
    build: Builder


KINDS: dict[str, SourceKind] = {}
SOURCE_KEYS: dict[str, Keys] = {}  # each registered type's keys


def register(
    *names: str, keys: Keys, targets: Keys = (), streams: bool = False
) -> Callable[[Builder], Builder]:
    """Register the decorated builder as the source kind(s) `names`; a kind's module does so on import."""
    schema = {f.name for f in fields(SourceConfig)}
    if not keys or not schema >= {*keys} or not {*TARGETS} >= {*targets}:
        raise ValueError(f"kind {names}: keys {keys} must be SourceConfig fields, targets of {TARGETS}")

    def add(build: Builder) -> Builder:
        for name in names:
            if name in KINDS:
                raise ValueError(f"a data source kind {name!r} is already registered")
            KINDS[name], SOURCE_KEYS[name] = SourceKind(name, keys, targets, streams, build), keys
        return build

    return add


def source_config(spec: SourceConfig | dict[str, Any]) -> SourceConfig:
    """A `SourceConfig` from itself or a plain dict (Python callers), unknown keys named with a hint."""
    if isinstance(spec, SourceConfig):
        return spec
    known = [f.name for f in fields(SourceConfig)]
    for name in spec:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {known}"
            raise ConfigError(f"unknown data source key {name!r}; {hint}")
    return SourceConfig(**spec)


def check_source(config: SourceConfig, target: str | None = None) -> SourceKind:
    """Reject a source the stage cannot read, and keys its type would ignore, before any work."""
    kind = KINDS.get(config.type)
    if kind is None:
        raise ConfigError(f"unknown data source type {config.type!r}; use one of {sorted(KINDS)}")
    if target is not None and target not in kind.targets:
        readers = sorted(name for name, other in KINDS.items() if target in other.targets)
        raise ConfigError(f"a {config.type!r} source has no {target}s; this stage reads {readers}")
    defaults = type(config)()  # a stage's own section (zero-shot sets) may default differently
    for key in (f.name for f in fields(SourceConfig)):
        if key not in (*kind.keys, "type", "weight") and getattr(config, key) != getattr(defaults, key):
            raise ConfigError(
                f"data source key {key!r} does not apply to a {config.type!r} source; "
                f"the keys that apply: {', '.join(kind.keys)}, weight"
            )
    if not getattr(config, kind.keys[0]):
        raise ConfigError(f"a {config.type!r} data source needs {kind.keys[0]!r}; add it to its config")
    return kind


def build_source(
    spec: SourceConfig | dict[str, Any], target: str | None = None, allow_empty_classes: bool = False
) -> Any:
    """The source a `SourceConfig` describes, whose samples carry `target` (None, "label", "caption");
    with `allow_empty_classes` an empty class folder only warns (evaluation sets score every class)."""
    config = source_config(spec)
    kind = check_source(config, target)
    source = kind.build(config, target, allow_empty_classes)
    if is_indexable(source) == kind.streams:  # the stream picks the epoch order from the source's shape
        order = "streamed" if kind.streams else "indexable (shuffled)"
        raise TypeError(f"the {kind.name!r} source kind declares a {order} order but built {source!r}")
    return source


def build_sources(
    specs: list[SourceConfig] | list[dict[str, Any]], samples_per_epoch: int = 0, target: str | None = None
) -> Any:
    """One source, or a weighted mixture of several (which needs `samples_per_epoch`)."""
    configs = [source_config(spec) for spec in specs]
    if not configs:
        raise ValueError("no data sources: list at least one under data.sources")
    if len(configs) == 1:
        return build_source(configs[0], target)
    if samples_per_epoch <= 0:
        raise ValueError("a mixture of data sources needs data.samples_per_epoch")
    return MixtureSource(
        [build_source(config, target) for config in configs], [c.weight for c in configs], samples_per_epoch
    )


for _module in pkgutil.iter_modules(__path__):  # every kind module registers itself on import
    importlib.import_module(f"{__name__}.{_module.name}")

from flyeva.data.sources.caption_folder import CaptionFolderSource
from flyeva.data.sources.captions import CaptionTableSource
from flyeva.data.sources.cifar import read_cifar_pickle
from flyeva.data.sources.filelist import FileListSource
from flyeva.data.sources.folder import ImageFolderSource
from flyeva.data.sources.imagenet import imagenet_wnids
from flyeva.data.sources.shapes import SyntheticShapesSource
from flyeva.data.sources.wds import WebDatasetSource
