"""Configs: typed dataclasses with the paper's defaults, a YAML recipe on top, `key=value` on top of that."""

from __future__ import annotations

import difflib
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

CONFIG_ROOT = Path(__file__).parent / "configs"
Schema = TypeVar("Schema")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key and the fix."""


def recipe_path(stage: str, name_or_path: str) -> Path:
    """A YAML path as given, or a named recipe shipped in `configs/<stage>/<name>.yaml`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_ROOT / stage / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in (CONFIG_ROOT / stage).glob("*.yaml"))
    raise ConfigError(f"no config file {name_or_path!r} and no {stage} recipe of that name; recipes: {known}")


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    """Every key of a structured config, with `N` for list items of dataclass type (data.sources.N.type)."""
    keys = []
    if OmegaConf.is_dict(node):
        for key in node:
            full = f"{prefix}{key}"
            keys.append(full)
            child = node._get_node(key)
            if OmegaConf.is_dict(child):
                keys += _all_keys(child, f"{full}.")
            elif OmegaConf.is_list(child) and is_dataclass(child._metadata.element_type):
                keys += _all_keys(OmegaConf.structured(child._metadata.element_type), f"{full}.N.")
    return keys


def _unknown_key_error(schema: Any, key: str, source: str) -> ConfigError:
    candidates = _all_keys(schema)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
    if not close:  # try the last component alone, e.g. `optim.lrr` -> `optim.lr`
        leaf = key.rsplit(".", 1)[-1]
        close = [
            c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], cutoff=0.75)
        ]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r} in {source}{hint}")


def _merge(schema: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(schema, other)
    except (ConfigKeyError, ConfigAttributeError) as error:
        raise _unknown_key_error(schema, str(error.full_key), source) from None
    except ValidationError as error:
        raise ConfigError(
            f"bad value for {error.full_key!r} in {source}: {error.msg.splitlines()[0]}"
        ) from None
    except TypeError as error:  # OmegaConf: a mapping given where the schema holds a list, or back
        raise ConfigError(
            f"{source} gives a value of the wrong kind ({error}); a list needs [...], a section {{...}}"
        ) from None


def _read_yaml(file: str | Path, keep_base: bool = False) -> Any:
    import yaml

    try:
        loaded = OmegaConf.load(file)
        if not keep_base and OmegaConf.is_dict(loaded) and "base" in loaded:
            loaded.pop("base")
        return loaded
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{file} is not valid YAML{line}: {problem}; fix the file") from None
    except OSError as error:
        raise ConfigError(f"cannot read config {file}: {error.strerror}") from None


def _recipe_chain(file: Path) -> list[Path]:
    """`file` and the recipes it builds on, base first: a recipe may start with `base: NAME`
    (a recipe in the same folder, or a path relative to it) and hold only what differs."""
    chain = [file]
    while True:
        raw = _read_yaml(chain[0], keep_base=True)
        base = raw.get("base") if OmegaConf.is_dict(raw) else None
        if base is None:
            return chain
        candidates = [chain[0].parent / f"{base}.yaml", chain[0].parent / str(base)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"{chain[0]}: base {base!r} is neither a recipe in {chain[0].parent} nor a file"
            )
        if found in chain:
            raise ConfigError(
                f"{chain[0]}: base {base!r} makes a cycle ({' -> '.join(p.stem for p in chain)})"
            )
        chain.insert(0, found)


def load_config(
    schema_cls: type[Schema], file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Schema:
    """Defaults from `schema_cls`, then the YAML `file`, then `key=value` overrides."""
    merged = OmegaConf.structured(schema_cls)
    for recipe in _recipe_chain(Path(file)) if file is not None else ():
        merged = _merge(merged, _read_yaml(recipe), str(recipe))
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value")
        if override.endswith("="):  # the shell ate the quotes of key=''
            key = override[:-1]
            raise ConfigError(f"override {override!r} has no value; for an empty string write \"{key}=''\"")
        merged = _merge(merged, OmegaConf.from_dotlist([override]), f"override {override!r}")
    return OmegaConf.to_object(merged)


def to_yaml(config: Any) -> str:
    """The fully resolved config as YAML (for `--print-config` and the run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def write_config(config: Any, folder: str | Path) -> Path:
    """`folder`/config.yaml: the resolved config a run folder keeps beside what it wrote."""
    path = Path(folder) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(config))
    return path


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (what the engine compares on resume)."""
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)
