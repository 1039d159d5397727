"""Initial weights of the EvaClip towers: an EVA encoder (`visual`), an open_clip text tower (`text`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from flyeva.models.checkpoint import CheckpointError, extract_state_dict, load_weights, read_checkpoint
from flyeva.models.convert import MIM_ONLY_KEYS, TOP_LEVEL_TEXT_KEYS, release_to_flyeva
from flyeva.models.weights import WEIGHTS_FILE, is_weights_folder
from flyeva.tasks.clip.model import ClipModelSection, EvaClip, build_clip

logger = logging.getLogger(__name__)


def build_clip_from_config(cfg: ClipModelSection) -> EvaClip:
    """`build_clip`, then the towers' initial weights from `vision.init` / `text.init` when given."""
    model = build_clip(cfg)
    if cfg.vision.init:
        load_vision_init(model.visual, cfg.vision.init)
    else:
        logger.warning(
            "model.vision.init is empty: the vision tower starts from random weights; EVA-CLIP starts "
            "from EVA's MIM weights (set model.vision.init to a `flyeva pretrain` OUTPUT/final folder)"
        )
    if cfg.text.init:
        load_text_init(model.text, cfg.text.init)
    return model


def _read_encoder_state(path: Path) -> dict[str, torch.Tensor]:
    """Encoder-named tensors of a flyeva folder or a release checkpoint (as `load_any` reads them)."""
    if is_weights_folder(path):
        return read_checkpoint(path / WEIGHTS_FILE if path.is_dir() else path)
    state, notes = release_to_flyeva(extract_state_dict(read_checkpoint(path)))
    if notes.dropped:
        logger.info("vision init %s: not used from the release file: %s", path, ", ".join(notes.dropped[:8]))
    return state


def load_vision_init(visual: nn.Module, path: str | Path) -> None:
    """Copy a pretrained EVA encoder (a `flyeva pretrain` folder or a release checkpoint) into the vision
    tower: MIM-only weights are dropped, another grid's position embedding is resized bicubically, and
    only `head` (the CLIP projection) stays fresh."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"vision init {path} does not exist; set model.vision.init to a flyeva folder"
        )
    state = _read_encoder_state(path)
    if dropped := sorted(k for k in state if k in MIM_ONLY_KEYS):
        why = "a CLIP vision tower has no [MASK] token or lm_head"
        logger.info("vision init %s: dropped the MIM-only weights %s (%s)", path, ", ".join(dropped), why)
    state = {k: v for k, v in state.items() if k not in MIM_ONLY_KEYS}
    if "pos_embed" in state and state["pos_embed"].shape != visual.pos_embed.shape:
        old_grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
        new_grid = tuple(visual.patch_embed.grid_size)
        logger.info(
            "vision init %s: position embedding resized from %dx%d to %s", path, old_grid, old_grid, new_grid
        )
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"].float(), new_grid, num_prefix_tokens=1)
    load_weights(visual, state, ignore_missing=("head.",))
    logger.info(
        "vision tower: %d tensors from %s; head (CLIP projection) newly initialised", len(state), path
    )


def text_state_from_clip(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """The text tower's keys of an open_clip CLIP state dict (top level, or under `text.`)."""
    if any(k.startswith("text.") for k in state):  # open_clip CustomTextCLIP / flyeva EvaClip
        return {k.removeprefix("text."): v for k, v in state.items() if k.startswith("text.")}
    text = {k: v for k, v in state.items() if k.startswith(TOP_LEVEL_TEXT_KEYS)}
    if not text:
        raise CheckpointError(
            f"{source} holds no CLIP text tower (expected keys like 'token_embedding.weight' or "
            f"'text.token_embedding.weight'); first keys: {sorted(state)[:5]}"
        )
    return text


def load_text_init(text: nn.Module, path: str | Path) -> None:
    """Copy the text tower of a local open_clip CLIP state dict (e.g. OpenAI CLIP-L's) into `text`.

    A `text_projection` of another shape starts fresh (CLIP-L projects 768 -> 768, EVA-CLIP-g 768 ->
    1024) and a longer position table is cut to the context; everything else must match exactly."""
    path = Path(path)
    try:
        raw = extract_state_dict(read_checkpoint(path))
    except CheckpointError as error:
        if "TorchScript" not in str(error):
            raise
        raise CheckpointError(
            f"{path} is OpenAI's TorchScript archive, which flyeva does not load (it runs code). Re-save it "
            "once as an open_clip state dict: `m = open_clip.create_model('ViT-L-14-quickgelu', "
            f"pretrained='{path}'); torch.save(m.state_dict(), 'ViT-L-14-openai.pt')`"
        ) from error
    state = text_state_from_clip(raw, str(path))
    # A tower init leaves the model's own temperature, also for the release's `text.logit_scale`.
    if (scale := state.pop("logit_scale", None)) is not None:
        message = "text init %s: text.logit_scale (exp = %.4g) not used; the temperature starts at %s"
        logger.info(message, path, float(scale.float().exp()), "model.init_logit_scale")
    state.pop("attn_mask", None)  # a causal-mask buffer older open_clip files hold; rebuilt from the context
    expected = text.state_dict()
    fresh = ()
    projection, wanted = state.get("text_projection"), tuple(expected["text_projection"].shape)
    if projection is not None and tuple(projection.shape) != wanted:
        fresh = ("text_projection",)
        message = "text init %s: text_projection %s does not fit %s (embed_dim differs); it starts fresh"
        logger.info(message, path, tuple(state.pop("text_projection").shape), wanted)
    positions, context = state.get("positional_embedding"), expected["positional_embedding"].shape[0]
    if positions is not None and positions.shape[0] > context:
        logger.info(
            "text init %s: position table cut from %d to the context length %d", path, len(positions), context
        )
        state["positional_embedding"] = positions[:context]
    load_weights(text, state, ignore_missing=fresh)
    logger.info("text tower: %d tensors from %s", len(state), path)
