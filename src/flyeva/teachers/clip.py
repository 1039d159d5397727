"""Frozen CLIP vision tower that produces EVA's MIM targets (docs/recipes.md §3).

Target = every patch token of the tower's last block after `ln_post`, CLS dropped, times `proj`
(1024 -> 768 for OpenAI ViT-L/14), computed under `torch.inference_mode()` on the unmasked crop.

Weights load from local files only, in five layouts (key maps: `flyeva.models.convert`):
1. flyeva weights folders of kind "teacher" (`save_clip_teacher`, `convert_openai_torchscript`):
   `model.safetensors` + `config.json` whose `arch` describes the tower; no model name needed.
2. open_clip state dicts (`.pt`/`.pth`/`.bin` via `torch.load(weights_only=True)`, or `.safetensors`)
   plus an open_clip model name such as 'ViT-L-14-quickgelu' (the default teacher). A `.safetensors`
   with a `.json` beside it (what `flyeva convert teacher` wrote before the folder) needs no name.
3. Hugging Face directories (config.json + model.safetensors or pytorch_model.bin) of
   `CLIPVisionModelWithProjection` or `CLIPModel`; read with json + safetensors/torch, no transformers.
4. OpenAI's TorchScript archive (`ViT-L-14.pt`) only through the one-time, explicit
   `flyeva convert teacher --openai-torchscript PATH --out DIR` (`convert_openai_torchscript`).
5. folders of `flyeva clip train` / `flyeva clip convert`: their EVA vision tower (`teachers/eva_tower.py`).

QuickGELU: OpenAI weights need it and GELU gives silently wrong features (docs/recipes.md §9). It is
decided by the model name (`-quickgelu`), HF `hidden_act`, or the folder's `arch`; a GELU name warns.
"""

from __future__ import annotations

import difflib
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flyeva.models.checkpoint import CheckpointError, extract_state_dict, read_checkpoint
from flyeva.models.convert import hf_to_open_clip_visual, open_clip_visual_state, openai_visual_arch
from flyeva.models.weights import WeightsError, is_weights_folder, load, read_config, save_weights
from flyeva.teachers.frozen import FrozenTeacher

logger = logging.getLogger(__name__)

DEFAULT_TEACHER = "ViT-L-14-quickgelu"  # OpenAI CLIP ViT-L/14 @224 with QuickGELU (docs/recipes.md §3)
# transformers' CLIPVisionConfig defaults, for config.json files that omit a field.
HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
)
FLAT_CFG_KEYS = ("image_size", "patch_size", "width", "layers", "heads", "mlp_ratio", "output_dim")


class TeacherLoadError(CheckpointError):
    """A teacher checkpoint could not be read or does not fit the requested architecture."""


@dataclass(frozen=True)
class TeacherArch:
    """A CLIP vision tower in open_clip's terms: `embed_dim` (= proj width = target dim), `vision_cfg`."""

    embed_dim: int
    vision_cfg: dict[str, Any]
    quick_gelu: bool
    name: str = "custom"

    def summary(self) -> dict[str, Any]:
        """The fields that decide the targets, for messages and for comparing two descriptions."""
        sizes = {key: self.vision_cfg.get(key) for key in ("image_size", "patch_size", "width", "layers")}
        head_width = self.vision_cfg.get("head_width", 64)  # open_clip's CLIPVisionCfg default
        return {**sizes, "head_width": head_width, "embed_dim": self.embed_dim, "quick_gelu": self.quick_gelu}


class ClipTeacher(FrozenTeacher):
    """Frozen CLIP vision tower; `forward(images)` returns EVA's MIM targets [B, num_patches, embed_dim]."""

    def __init__(self, arch: TeacherArch):
        super().__init__()
        from open_clip.model import _build_vision_tower  # lazy: importing open_clip takes seconds

        _check_supported(arch)
        try:
            self.visual = _build_vision_tower(arch.embed_dim, dict(arch.vision_cfg), arch.quick_gelu)
        except TypeError as err:
            raise ValueError(f"invalid open_clip vision_cfg {arch.vision_cfg}: {err}") from err
        grid_h, grid_w = self.visual.grid_size
        if grid_h != grid_w or self.visual.patch_size[0] != self.visual.patch_size[1]:
            raise ValueError(f"only square teachers are supported, got grid {self.visual.grid_size}")
        self.arch = arch
        self.name = arch.name
        self.quick_gelu = arch.quick_gelu
        self.grid_size: tuple[int, int] = (grid_h, grid_w)
        self.patch_size: int = self.visual.patch_size[0]
        self.image_size: int = self.visual.image_size[0]
        self.embed_dim: int = arch.embed_dim
        self.num_patches: int = grid_h * grid_w
        if arch.quick_gelu:
            _use_inplace_quick_gelu(self.visual)
        self.freeze()

    def patch_targets(self, images: Tensor) -> Tensor:
        visual = self.visual
        tokens = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls_token = visual.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls_token, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
        tokens = visual.transformer(visual.ln_pre(tokens))
        # ln_post on every token, CLS dropped, then proj: projected targets (docs/recipes.md §3).
        return visual.ln_post(tokens)[:, 1:] @ visual.proj


class InplaceQuickGELU(nn.Module):
    """QuickGELU, x * sigmoid(1.702 x), computed in place as silu(1.702 x) / 1.702 under inference mode:
    one fused pass instead of three (24.8 -> 8.8 ms for a CLIP-B layer at batch 8 on one CPU core)."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_inference_mode_enabled() and x.is_inference():
            return F.silu(x.mul_(1.702), inplace=True).div_(1.702)
        return x * torch.sigmoid(1.702 * x)


def _use_inplace_quick_gelu(visual: nn.Module) -> None:
    from open_clip.transformer import QuickGELU

    for module in list(visual.modules()):
        for name, child in module.named_children():
            if isinstance(child, QuickGELU):
                setattr(module, name, InplaceQuickGELU())


def _check_supported(arch: TeacherArch) -> None:
    cfg = arch.vision_cfg
    if (
        cfg.get("timm_model_name")
        or isinstance(cfg.get("layers"), list | tuple)
        or cfg.get("attentional_pool")
    ):
        raise ValueError(
            f"teacher '{arch.name}' is not a plain open_clip VisionTransformer (timm, ResNet or attentional "
            f"pool towers have no ln_post/proj patch tokens); use a ViT CLIP such as '{DEFAULT_TEACHER}'"
        )


def arch_from_model_name(model_name: str) -> TeacherArch:
    """Resolve an open_clip model name with open_clip's bundled configs (never downloads)."""
    import open_clip  # lazy: importing open_clip takes seconds

    if model_name.startswith("hf-hub:"):
        raise TeacherLoadError(f"'{model_name}' would download; pass a local file and a bundled model name")
    config = open_clip.get_model_config(model_name)
    if config is None:
        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=3, cutoff=0.5)
        raise TeacherLoadError(
            f"unknown open_clip model name '{model_name}'; closest: {close or 'none'} "
            f"(the OpenAI ViT-L/14 teacher is '{DEFAULT_TEACHER}')"
        )
    quick_gelu = bool(config.get("quick_gelu", False))
    if not quick_gelu:
        logger.warning(
            f"open_clip model '{model_name}' uses GELU. OpenAI CLIP weights need QuickGELU "
            f"('{model_name}-quickgelu'), otherwise the targets are silently wrong (docs/recipes.md §9); "
            f"keep '{model_name}' only for GELU-trained weights."
        )
    return TeacherArch(config["embed_dim"], dict(config["vision_cfg"]), quick_gelu, name=model_name)


def arch_from_dict(config: dict[str, Any]) -> TeacherArch:
    """Accept an open_clip model config (embed_dim, vision_cfg, quick_gelu) or a flat dict with keys
    image_size, patch_size, width, layers, heads, mlp_ratio, output_dim and quick_gelu (default True,
    as for the OpenAI teacher) or act ('quick_gelu' | 'gelu')."""
    config = dict(config)
    if "vision_cfg" in config:  # open_clip semantics: no quick_gelu key means GELU
        quick_gelu = _quick_gelu_flag(config, default=False)
        return TeacherArch(
            config["embed_dim"], dict(config["vision_cfg"]), quick_gelu, name=config.get("name", "custom")
        )
    quick_gelu = _quick_gelu_flag(config, default=True)
    unknown = set(config) - {*FLAT_CFG_KEYS, "quick_gelu", "act", "layer_norm_eps", "name"}
    missing = {"image_size", "patch_size", "width", "layers", "heads", "output_dim"} - set(config)
    if unknown or missing:
        hints = {key: difflib.get_close_matches(key, FLAT_CFG_KEYS, n=1) for key in sorted(unknown)}
        raise ValueError(
            f"bad teacher config: unknown keys {hints or '{}'} (key: closest valid), "
            f"missing {sorted(missing)}"
        )
    if config["width"] % config["heads"]:
        raise ValueError(f"teacher width {config['width']} is not divisible by heads {config['heads']}")
    vision_cfg = dict(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        width=config["width"],
        layers=config["layers"],
        head_width=config["width"] // config["heads"],
        mlp_ratio=float(config.get("mlp_ratio", 4.0)),
    )
    if config.get("layer_norm_eps", 1e-5) != 1e-5:  # open_clip's LayerNorm default eps is 1e-5
        vision_cfg["norm_kwargs"] = {"eps": float(config["layer_norm_eps"])}
    return TeacherArch(config["output_dim"], vision_cfg, quick_gelu, name=config.get("name", "custom"))


def _quick_gelu_flag(config: dict[str, Any], default: bool) -> bool:
    act = config.pop("act", None)
    if act is not None:
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"teacher act must be 'quick_gelu' or 'gelu', got '{act}'")
        return act == "quick_gelu"
    return bool(config.pop("quick_gelu", default))


def arch_from_hf_config(config: dict[str, Any], name: str) -> TeacherArch:
    """Architecture of a HF `CLIPVisionModelWithProjection` (flat config) or `CLIPModel` (nested)."""
    if config.get("model_type") not in (None, "clip", "clip_vision_model"):
        raise TeacherLoadError(
            f"{name}: config.json model_type '{config['model_type']}' is not a CLIP model "
            "(expected 'clip' or 'clip_vision_model')"
        )
    vision = {**HF_VISION_DEFAULTS, **(config.get("vision_config") or config)}
    projection_dim = config.get("projection_dim", vision["projection_dim"])  # CLIPModel keeps it top-level
    act = vision["hidden_act"]
    if act not in ("quick_gelu", "gelu"):
        raise TeacherLoadError(f"{name}: hidden_act '{act}' is not supported (use 'quick_gelu' or 'gelu')")
    return arch_from_dict(
        dict(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            width=vision["hidden_size"],
            layers=vision["num_hidden_layers"],
            heads=vision["num_attention_heads"],
            mlp_ratio=vision["intermediate_size"] / vision["hidden_size"],
            output_dim=projection_dim,
            layer_norm_eps=vision["layer_norm_eps"],
            act=act,
            name=name,
        )
    )


def build_clip_teacher(model_name_or_cfg: str | dict[str, Any], *, seed: int | None = None) -> ClipTeacher:
    """A randomly initialised teacher from an open_clip model name or a config dict (see `arch_from_dict`),
    e.g. dict(image_size=32, patch_size=4, width=64, layers=2, heads=2, mlp_ratio=4, output_dim=32)."""
    read_arch = arch_from_model_name if isinstance(model_name_or_cfg, str) else arch_from_dict
    arch = read_arch(model_name_or_cfg)
    if seed is None:
        return ClipTeacher(arch)
    with torch.random.fork_rng(devices=[]):  # a seeded build leaves the global RNG untouched
        torch.manual_seed(seed)
        return ClipTeacher(arch)


def build_from_arch(arch: dict[str, Any]) -> ClipTeacher:
    """What `flyeva.models.weights.load` builds for a folder of kind "teacher" (arch: `arch_from_dict`'s)."""
    return ClipTeacher(arch_from_dict(arch))


@contextmanager
def teacher_errors() -> Iterator[None]:
    """The shared readers and key maps raise WeightsError; a teacher's callers catch TeacherLoadError."""
    try:
        yield
    except TeacherLoadError:
        raise
    except WeightsError as err:
        raise TeacherLoadError(str(err)) from err


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a .safetensors file or a `torch.load(weights_only=True)` checkpoint ('state_dict' and
    'module.' wrappers removed); every failure is a `TeacherLoadError` naming the problem."""
    fix = "From a trusted copy re-save only the state dict (torch.save(model.state_dict(), ...))."
    with teacher_errors():
        return extract_state_dict(read_checkpoint(path, pickle_fix=fix))


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index_name).is_file():  # sharded checkpoint
            shards = sorted(set(json.loads((directory / index_name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in read_state_dict(directory / shard).items()}
    for weights_name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / weights_name).is_file():
            return read_state_dict(directory / weights_name)
    raise TeacherLoadError(f"{directory} has config.json but no model.safetensors or pytorch_model.bin")


def load_visual_state(teacher: ClipTeacher, visual_state: dict[str, Tensor], source: str) -> None:
    """Copy weights into the tower after checking that keys and shapes match exactly."""
    expected = teacher.visual.state_dict()
    missing = sorted(set(expected) - set(visual_state))
    unexpected = sorted(set(visual_state) - set(expected))
    misshaped = [
        f"{key}: file {list(visual_state[key].shape)} vs model {list(expected[key].shape)}"
        for key in sorted(set(expected) & set(visual_state))
        if visual_state[key].shape != expected[key].shape
    ]
    if missing or unexpected or misshaped:
        problems = [
            f"{label} ({len(keys)}): "
            + ", ".join(keys[:8])
            + (f", ... {len(keys) - 8} more" if len(keys) > 8 else "")
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise TeacherLoadError(
            f"{source} does not fit teacher '{teacher.arch.name}' {teacher.arch.summary()}: "
            + "; ".join(problems)
            + ". Pass the model name the weights were trained with (e.g. 'ViT-B-16' vs 'ViT-L-14-quickgelu')."
        )
    teacher.visual.load_state_dict(visual_state, strict=True)  # copy_ casts fp16 weights to fp32


def save_clip_teacher(teacher: ClipTeacher, folder: str | Path, *, source: str | None = None) -> Path:
    """Write the tower as a flyeva weights folder of kind "teacher" (fp32), loadable without a model name."""
    arch = {
        "name": teacher.arch.name,
        "act": "quick_gelu" if teacher.arch.quick_gelu else "gelu",
        "embed_dim": teacher.arch.embed_dim,
        "vision_cfg": teacher.arch.vision_cfg,
    }
    state = {k: v.detach().float() for k, v in teacher.state_dict().items()}  # fp32 whatever it ran in
    return save_weights(state, folder, kind="teacher", arch=arch, source={"file": source} if source else None)


def convert_openai_torchscript(src: str | Path, dst: str | Path) -> Path:
    """One-time, explicit conversion of OpenAI's TorchScript CLIP archive (e.g. ViT-L-14.pt) into the
    weights folder `dst` (kind "teacher": fp32 `visual.*` weights and the inferred architecture).
    This runs `torch.jit.load`, i.e. the archive's code: use it only on a file you trust."""
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise TeacherLoadError(f"TorchScript archive not found: {src}")
    if dst.suffix == ".safetensors":  # refused before the archive's code runs
        raise ValueError(
            "a teacher is written as a weights folder (model.safetensors + config.json), not one file: "
            f"pass --out {dst.with_suffix('')}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            archive = torch.jit.load(str(src), map_location="cpu")
    except RuntimeError as err:
        raise TeacherLoadError(
            f"{src} is not a TorchScript archive ({str(err).splitlines()[0]}); a plain state dict loads "
            "directly with load_clip_teacher(path, model_name)"
        ) from err
    state = archive.state_dict()
    if "visual.proj" not in state:
        raise TeacherLoadError(
            f"{src} has no ViT vision tower ('visual.proj'); ResNet CLIPs are not supported"
        )
    with teacher_errors():
        visual_state = open_clip_visual_state(state, str(src))
        teacher = build_from_arch({**openai_visual_arch(visual_state), "name": f"openai:{src.stem}"})
    load_visual_state(teacher, visual_state, str(src))
    return save_clip_teacher(teacher, dst, source=src.name)


def is_teacher_folder(path: Path) -> bool:
    """A flyeva weights folder of kind "teacher" (`flyeva convert teacher` writes one)."""
    try:
        return is_weights_folder(path) and read_config(path)["kind"] == "teacher"
    except WeightsError:  # e.g. a Hugging Face folder: its config.json has no `kind`
        return False


def _check_model_name(arch: TeacherArch, model_name: str | None, described_by: Path) -> None:
    if model_name is not None and arch_from_model_name(model_name).summary() != arch.summary():
        raise TeacherLoadError(
            f"model_name '{model_name}' contradicts {described_by} {arch.summary()}; drop model_name"
        )


def _arch_and_visual_state(path: Path, model_name: str | None) -> tuple[TeacherArch, dict[str, Tensor]]:
    """A Hugging Face folder, a `.safetensors` with the older JSON beside it, or an open_clip file."""
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TeacherLoadError(
                f"{path} is a directory without config.json; pass a Hugging Face CLIP folder"
            )
        if model_name is not None:
            logger.warning("ignoring model_name '%s': %s/config.json defines the teacher", model_name, path)
        arch = arch_from_hf_config(json.loads((path / "config.json").read_text()), name=f"hf:{path.name}")
        return arch, hf_to_open_clip_visual(_read_hf_weights(path), str(path))
    visual_state = open_clip_visual_state(read_state_dict(path), str(path))
    sidecar = path.with_suffix(".json")  # beside a `.safetensors` teacher of the older layout
    if path.suffix == ".safetensors" and sidecar.is_file():
        arch = arch_from_dict(json.loads(sidecar.read_text()))
        _check_model_name(arch, model_name, sidecar)
        return arch, visual_state
    if model_name is None:
        raise TeacherLoadError(
            f"{path} is an open_clip state dict: pass its model name, e.g. '{DEFAULT_TEACHER}' for "
            "OpenAI ViT-L/14 weights"
        )
    return arch_from_model_name(model_name), visual_state


def load_clip_teacher(
    path: str | Path, model_name: str | None = None, *, device: str | torch.device = "cpu"
) -> ClipTeacher:
    """A frozen CLIP teacher from local files in any layout of the module docstring; only a bare
    open_clip state dict needs `model_name` (a TorchScript archive is an error naming the conversion)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise TeacherLoadError(f"teacher weights not found: {path} (flyeva reads local files only)")
    from flyeva.teachers.eva_tower import is_eva_clip_folder, load_eva_clip_teacher

    if path.is_dir() and is_eva_clip_folder(path):  # a flyeva EVA-CLIP (`clip train`, `clip convert`)
        return load_eva_clip_teacher(path)
    with teacher_errors():
        if is_teacher_folder(path):
            teacher = load(path)
            _check_model_name(teacher.arch, model_name, path)
        else:
            arch, visual_state = _arch_and_visual_state(path, model_name)
            teacher = ClipTeacher(arch)
            load_visual_state(teacher, visual_state, str(path))
    logger.info(
        "CLIP teacher '%s' from %s: %dx%d tokens of dim %d, %s",
        teacher.arch.name,
        path,
        *teacher.grid_size,
        teacher.embed_dim,
        "QuickGELU" if teacher.arch.quick_gelu else "GELU",
    )
    return teacher.to(device)


def check_token_grid(teacher: FrozenTeacher, student_grid: tuple[int, int], student_image_size: int) -> None:
    """Raise ValueError unless teacher and student tokenise the same crop into the same grid, so that
    each student token has a target token (docs/recipes.md §3: 224 px / patch 14 -> 16x16 on both)."""
    student_grid = tuple(student_grid)
    if teacher.grid_size == student_grid:
        return
    teacher_side = teacher.grid_size[0]
    student_patch = student_image_size // student_grid[0]
    fixes = [f"a teacher whose image_size // patch_size is {student_grid[0]}"]
    if student_image_size % teacher_side == 0:
        fixes.append(f"student patch size {student_image_size // teacher_side} at {student_image_size} px")
    fixes.append(f"student image size {teacher_side * student_patch} with patch {student_patch}")
    raise ValueError(
        f"token grids differ: teacher '{teacher.name}' gives {teacher_side}x{teacher_side} "
        f"({teacher.image_size} px / patch {teacher.patch_size}) but the student gives "
        f"{student_grid[0]}x{student_grid[1]} ({student_image_size} px / patch {student_patch}). "
        f"Use {' or '.join(fixes)}."
    )
