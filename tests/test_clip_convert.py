"""Release EVA-CLIP checkpoints -> flyeva: both towers, the head bias, logit_scale, the text activation.

The checkpoint is built here with the release's key names and shapes (`EVA-CLIP/rei/eva_clip`:
`visual.*` EVA tower with `visual.head` weight and bias, text tower under `text.` or at the top
level, `text.logit_scale`), and the reference embeddings are computed by the plain-torch forward
below, written from the release's model code and not from flyeva's or timm's.
"""

import json
import math

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from flyeva.cli import main
from flyeva.data.transforms import EvalTransform
from flyeva.tasks.clip.convert import clip_from_state_dict, load_any_clip
from flyeva.tasks.clip.model import load_clip
from flyeva.tasks.clip.open_clip_export import open_clip_state_dict

# Tiny tower sizes of no named size: heads cannot be read off the shapes and are passed.
IMG, PATCH, WIDTH, DEPTH, HEADS, MLP = 16, 4, 32, 2, 2, 80
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS, CONTEXT, VOCAB, EMBED = 32, 2, 2, 12, 49408, 16
READING = {"num_heads": HEADS, "text_heads": TEXT_HEADS}


def release_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A random EVA-CLIP state dict in the release's layout (CustomCLIP: text under `text.`)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    def norm(prefix, dim):
        return {f"{prefix}.weight": 1 + rand(dim, scale=0.1), f"{prefix}.bias": rand(dim, scale=0.1)}

    tokens = (IMG // PATCH) ** 2 + 1
    state = {
        "visual.cls_token": rand(1, 1, WIDTH),
        "visual.pos_embed": rand(1, tokens, WIDTH),
        "visual.patch_embed.proj.weight": rand(WIDTH, 3, PATCH, PATCH),
        "visual.patch_embed.proj.bias": rand(WIDTH),
        **norm("visual.norm", WIDTH),
        "visual.head.weight": rand(EMBED, WIDTH),
        "visual.head.bias": rand(EMBED),  # the bias the first converter dropped
    }
    for i in range(DEPTH):
        block = f"visual.blocks.{i}"
        state.update(norm(f"{block}.norm1", WIDTH) | norm(f"{block}.norm2", WIDTH))
        state.update(
            {f"{block}.attn.qkv.weight": rand(3 * WIDTH, WIDTH), f"{block}.attn.q_bias": rand(WIDTH)}
        )
        state.update({f"{block}.attn.v_bias": rand(WIDTH), f"{block}.attn.proj.weight": rand(WIDTH, WIDTH)})
        state.update({f"{block}.attn.proj.bias": rand(WIDTH), f"{block}.mlp.fc1.weight": rand(MLP, WIDTH)})
        state.update({f"{block}.mlp.fc1.bias": rand(MLP), f"{block}.mlp.fc2.weight": rand(WIDTH, MLP)})
        state[f"{block}.mlp.fc2.bias"] = rand(WIDTH)
    state.update(
        {
            "text.token_embedding.weight": rand(VOCAB, TEXT_WIDTH),
            "text.positional_embedding": rand(CONTEXT, TEXT_WIDTH, scale=0.05),
            **norm("text.ln_final", TEXT_WIDTH),
            "text.text_projection": rand(TEXT_WIDTH, EMBED),
            "text.logit_scale": torch.tensor(math.log(50.0)),  # what the release's loader uses
            "logit_scale": torch.tensor(math.log(1 / 0.07)),  # overwritten by text.logit_scale there
        }
    )
    for i in range(TEXT_LAYERS):
        block = f"text.transformer.resblocks.{i}"
        state.update(norm(f"{block}.ln_1", TEXT_WIDTH) | norm(f"{block}.ln_2", TEXT_WIDTH))
        state[f"{block}.attn.in_proj_weight"] = rand(3 * TEXT_WIDTH, TEXT_WIDTH)
        state[f"{block}.attn.in_proj_bias"] = rand(3 * TEXT_WIDTH)
        state[f"{block}.attn.out_proj.weight"] = rand(TEXT_WIDTH, TEXT_WIDTH)
        state[f"{block}.attn.out_proj.bias"] = rand(TEXT_WIDTH)
        state[f"{block}.mlp.c_fc.weight"] = rand(4 * TEXT_WIDTH, TEXT_WIDTH)
        state[f"{block}.mlp.c_fc.bias"] = rand(4 * TEXT_WIDTH)
        state[f"{block}.mlp.c_proj.weight"] = rand(TEXT_WIDTH, 4 * TEXT_WIDTH)
        state[f"{block}.mlp.c_proj.bias"] = rand(TEXT_WIDTH)
    return state


def attention(x, qkv_weight, qkv_bias, out_weight, out_bias, heads, causal=False):
    batch, length, width = x.shape
    q, k, v = (x @ qkv_weight.T + qkv_bias).reshape(batch, length, 3, heads, width // heads).unbind(2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(width // heads)
    if causal:
        logits = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    mixed = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).reshape(batch, length, width)
    return mixed @ out_weight.T + out_bias


def layer_norm(x, s, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], s[f"{prefix}.weight"], s[f"{prefix}.bias"], eps)


def reference_image(s, images):
    """The release's EVAVisionTransformer: patches + CLS + positions, pre-norm blocks (LayerNorm eps
    1e-6, qkv bias = [q_bias, 0, v_bias], exact GELU), final norm, CLS -> head (weight and bias)."""
    x = F.conv2d(images, s["visual.patch_embed.proj.weight"], s["visual.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.cls_token"].expand(len(x), -1, -1), x], 1) + s["visual.pos_embed"]
    for i in range(DEPTH):
        b = f"visual.blocks.{i}"
        qkv_bias = torch.cat([s[f"{b}.attn.q_bias"], torch.zeros(WIDTH), s[f"{b}.attn.v_bias"]])
        h = layer_norm(x, s, f"{b}.norm1", 1e-6)
        x = x + attention(h, s[f"{b}.attn.qkv.weight"], qkv_bias, s[f"{b}.attn.proj.weight"],
                          s[f"{b}.attn.proj.bias"], HEADS)  # fmt: skip
        h = layer_norm(x, s, f"{b}.norm2", 1e-6)
        h = F.gelu(h @ s[f"{b}.mlp.fc1.weight"].T + s[f"{b}.mlp.fc1.bias"])
        x = x + h @ s[f"{b}.mlp.fc2.weight"].T + s[f"{b}.mlp.fc2.bias"]
    cls = layer_norm(x, s, "visual.norm", 1e-6)[:, 0]
    return cls @ s["visual.head.weight"].T + s["visual.head.bias"]


def reference_text(s, tokens, quick_gelu=False):
    """The release's TextTransformer: causal pre-norm blocks (eps 1e-5), EOT (argmax) token -> projection."""
    act = (lambda t: t * torch.sigmoid(1.702 * t)) if quick_gelu else F.gelu
    x = s["text.token_embedding.weight"][tokens] + s["text.positional_embedding"]
    for i in range(TEXT_LAYERS):
        b = f"text.transformer.resblocks.{i}"
        h = layer_norm(x, s, f"{b}.ln_1", 1e-5)
        weights = [s[f"{b}.attn.{name}"] for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight")]
        x = x + attention(h, *weights, s[f"{b}.attn.out_proj.bias"], TEXT_HEADS, causal=True)
        h = act(layer_norm(x, s, f"{b}.ln_2", 1e-5) @ s[f"{b}.mlp.c_fc.weight"].T + s[f"{b}.mlp.c_fc.bias"])
        x = x + h @ s[f"{b}.mlp.c_proj.weight"].T + s[f"{b}.mlp.c_proj.bias"]
    x = layer_norm(x, s, "text.ln_final", 1e-5)
    return x[torch.arange(len(x)), tokens.argmax(-1)] @ s["text.text_projection"]


def inputs(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, IMG, IMG, generator=generator)
    tokens = torch.randint(1, 40000, (3, CONTEXT), generator=generator)
    tokens[:, -3:] = 0
    tokens[torch.arange(3), torch.tensor([4, 6, 8])] = 49407  # the end-of-text token pools
    return images, tokens


def reference_outputs(state, quick_gelu=False):
    images, tokens = inputs()
    image = F.normalize(reference_image(state, images), dim=-1)
    text = F.normalize(reference_text(state, tokens, quick_gelu), dim=-1)
    return image, text, state["text.logit_scale"].exp() * image @ text.T


def flyeva_outputs(model):
    images, tokens = inputs()
    with torch.no_grad():
        image, text, scale = model.eval()(images, tokens)
    return image, text, scale * image @ text.T


def assert_outputs_close(got, want, atol=1e-5):
    for name, a, b in zip(("image", "text", "logits"), got, want, strict=True):
        assert a.shape == b.shape, name
        assert (a - b).abs().max() <= atol * max(1.0, b.abs().max()), (name, (a - b).abs().max())


@pytest.mark.parametrize("layout", ["custom_clip", "top_level_text"])
def test_release_checkpoint_gives_the_reference_embeddings_and_logits(tmp_path, layout):
    state = release_state()
    want = reference_outputs(state)
    saved = dict(state)
    if layout == "top_level_text":  # the release's CLIP class keeps the text tower at the top level
        saved = {k.removeprefix("text.") if k != "text.logit_scale" else k: v for k, v in saved.items()}
    torch.save({"module": {k: v.half() if v.ndim > 1 else v for k, v in saved.items()}}, tmp_path / "fp16.pt")
    torch.save(saved, tmp_path / "eva_clip.pt")

    model, section, provenance = load_any_clip(tmp_path / "eva_clip.pt", **READING)
    assert provenance["layout"] == "eva-clip-release" and provenance["text_activation"] == "GELU"
    assert (section.embed_dim, section.text.layers, section.text.heads, section.text.quick_gelu) == (
        16,
        2,
        2,
        False,
    )
    size = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 80}
    assert section.vision.size == size
    assert float(model.logit_scale.detach().exp()) == pytest.approx(50.0, rel=1e-6)  # text.logit_scale wins
    assert_outputs_close(flyeva_outputs(model), want)
    half, _, _ = load_any_clip(tmp_path / "fp16.pt", **READING)  # the release ships fp16 files
    assert_outputs_close(flyeva_outputs(half), want, atol=2e-2)


def test_convert_command_writes_a_folder_that_loads_bit_identically(tmp_path, capsys):
    state = release_state()
    torch.save(state, tmp_path / "eva_clip.pt")
    argv = ["clip", "convert", str(tmp_path / "eva_clip.pt"), "--out", str(tmp_path / "flyeva")]
    assert main([*argv, "--num-heads", "2", "--text-heads", "2"]) == 0
    assert "text activation GELU (EVA-CLIP release layout" in capsys.readouterr().out
    config = json.loads((tmp_path / "flyeva" / "config.json").read_text())
    assert config["kind"] == "clip" and config["source"]["layout"] == "eva-clip-release"
    direct, _, _ = load_any_clip(tmp_path / "eva_clip.pt", **READING)
    folder, _ = load_clip(tmp_path / "flyeva")
    for key, value in direct.state_dict().items():
        assert torch.equal(folder.state_dict()[key], value), key
    assert_outputs_close(flyeva_outputs(folder), reference_outputs(state))


def test_the_text_activation_is_never_chosen_silently(tmp_path, capsys):
    state = release_state()
    quick, _, provenance = clip_from_state_dict(state, text_act="quickgelu", **READING)
    assert provenance["text_activation_from"] == "--text-act quickgelu"
    assert_outputs_close(flyeva_outputs(quick), reference_outputs(state, quick_gelu=True))
    gelu_text = reference_outputs(state)[1]
    assert (flyeva_outputs(quick)[1] - gelu_text).abs().max() > 1e-3  # the wrong activation shows

    # An open_clip file cannot say which activation its text tower was trained with.
    model, _, _ = clip_from_state_dict(state, **READING)
    torch.save(open_clip_state_dict(model), tmp_path / "open_clip.pt")
    with pytest.raises(ValueError, match="does not say its text activation: pass --text-act gelu"):
        load_any_clip(tmp_path / "open_clip.pt", **READING)
    argv = [
        "clip",
        "convert",
        str(tmp_path / "open_clip.pt"),
        "--out",
        str(tmp_path / "x"),
        "--num-heads",
        "2",
    ]
    assert main(argv) == 2
    assert "--text-act" in capsys.readouterr().err
    again, _, provenance = load_any_clip(tmp_path / "open_clip.pt", text_act="gelu", **READING)
    assert provenance["layout"] == "open_clip"
    assert_outputs_close(flyeva_outputs(again), reference_outputs(state))


def test_unreadable_layouts_are_one_line_errors():
    state = release_state()
    no_head = {k: v for k, v in state.items() if not k.startswith("visual.head.")}
    with pytest.raises(ValueError, match="no head"):
        clip_from_state_dict(no_head, **READING)
    openai_vit = {
        "visual.conv1.weight": torch.zeros(1),
        **{k: v for k, v in state.items() if k.startswith("text.")},
    }
    with pytest.raises(ValueError, match="no EVA vision tower"):
        clip_from_state_dict(openai_vit)
    with pytest.raises(ValueError, match="match no named size; pass the number of attention heads"):
        clip_from_state_dict(state, text_heads=2)


def colour_square(colour, offset):
    pixels = np.full((IMG, IMG, 3), 128, dtype=np.uint8)
    pixels[offset : offset + 6, offset : offset + 6] = colour
    return Image.fromarray(pixels)


def test_zeroshot_runs_on_release_and_open_clip_checkpoints_directly(tmp_path):
    classes = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 200, 60), "black": (0, 0, 0)}
    for name, colour in classes.items():
        (tmp_path / "set" / name).mkdir(parents=True)
        for offset in range(3):
            colour_square(colour, 2 + 3 * offset).save(tmp_path / "set" / name / f"{offset}.png")
    state = release_state()
    torch.save(state, tmp_path / "eva_clip.pt")
    model, _, _ = clip_from_state_dict(state, **READING)
    torch.save(open_clip_state_dict(model), tmp_path / "open_clip.pt")

    # By hand: reference towers, one template, normalised class embeddings.
    names = sorted(classes)
    tokens = open_clip.tokenize([f"a {name} square" for name in names], context_length=CONTEXT)
    classifier = F.normalize(reference_text(state, tokens), dim=-1)
    transform, correct = EvalTransform(IMG), 0
    for label, name in enumerate(names):
        for path in sorted((tmp_path / "set" / name).iterdir()):
            image = reference_image(state, transform(Image.open(path).convert("RGB"))[None])
            correct += int((F.normalize(image, dim=-1) @ classifier.T).argmax() == label)
    expected_top1 = 100.0 * correct / 12

    for checkpoint, extra in (("eva_clip.pt", []), ("open_clip.pt", ["--text-act", "gelu"])):
        report = tmp_path / f"{checkpoint}.json"
        argv = ["clip", "zeroshot", "--checkpoint", str(tmp_path / checkpoint), "--json", str(report)]
        argv += ["--dataset", f"folder:{tmp_path / 'set'}:colours", "--num-heads", "2", "--text-heads", "2"]
        argv += [*extra, "zeroshot.templates=['a {} square']", "zeroshot.num_workers=0"]
        assert main(argv) == 0
        scores = json.loads(report.read_text())["datasets"]["colours"]
        assert (scores["images"], scores["classes"]) == (12, 4)
        assert scores["top1"] == pytest.approx(expected_top1), checkpoint
