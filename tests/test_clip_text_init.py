"""`model.text.init` from a release EVA-CLIP file, whose text tower holds the temperature.

The file is the miniature recipe's EvaClip (the project's builders, random weights) saved with the
release's key layout (`EVA-CLIP/rei/eva_clip` CustomCLIP: `visual.*`, `text.*`, `text.logit_scale`
in the text tower beside the top-level `logit_scale`), as tests/test_clip_convert.py fabricates it.
"""

import logging
import math

import torch

from flyeva.config import load_config, recipe_path
from flyeva.models.convert import EVA_CLIP_RELEASE, split_clip_state
from flyeva.tasks.clip.config import ClipConfig
from flyeva.tasks.clip.init_weights import build_clip_from_config
from flyeva.tasks.clip.model import INIT_LOGIT_SCALE, build_clip
from flyeva.tasks.clip.zeroshot import tokenizer_for

RELEASE_TEMPERATURE = math.log(50.0)


def test_text_init_from_a_release_eva_clip_file_loads_the_tower_and_keeps_the_models_temperature(
    tmp_path, caplog
):
    torch.manual_seed(0)
    source = build_clip(load_config(ClipConfig, recipe_path("clip", "miniature"), []).model).eval()
    with torch.no_grad():  # no weight left at a value an init could produce
        for param in source.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state = dict(source.state_dict())
    state["text.logit_scale"] = torch.tensor(RELEASE_TEMPERATURE)  # the release's text tower holds it
    state["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    assert split_clip_state(state, "fabricated").layout == EVA_CLIP_RELEASE
    torch.save(state, tmp_path / "EVA_CLIP_release.pt")

    overrides = [f"model.text.init={tmp_path / 'EVA_CLIP_release.pt'}"]
    cfg = load_config(ClipConfig, recipe_path("clip", "miniature"), overrides)
    with caplog.at_level(logging.INFO, logger="flyeva.tasks.clip.init_weights"):
        model = build_clip_from_config(cfg.model).eval()

    loaded = model.text.state_dict()
    for key, value in source.text.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert model.logit_scale.item() == torch.tensor(INIT_LOGIT_SCALE).item()  # not the file's
    assert "text.logit_scale" in caplog.text and "50" in caplog.text
    tokens = tokenizer_for(cfg.model.text.context_length)(["a large circle", "two squares"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(tokens), source.encode_text(tokens), rtol=0, atol=0)
