"""The inflated video EVA: parity with the image model, the position-table resize, weights import."""

from __future__ import annotations

import math

import pytest
import torch
from timm.models.eva import Eva

from flyeva.models.eva import EvaSize, eva_kwargs
from flyeva.models.weights import load, save_weights
from flyeva.tasks.video.convert import map_classifier_rows, release_video_state
from flyeva.tasks.video.model import (
    build_from_arch,
    build_video_model,
    inflate_image_state,
    resize_pos_embed,
    video_arch,
)

SIZE = EvaSize(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_dim=128)
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def image_model() -> Eva:
    """An image classifier (mean pooling -> fc_norm -> head) with non-trivial random weights."""
    torch.manual_seed(0)
    model = Eva(**eva_kwargs(SIZE, num_classes=NUM_CLASSES, global_pool="avg", use_fc_norm=True)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    return model


def _video_from_image(image: Eva, num_frames: int, tubelet: int = 1):
    encoder = {k: v for k, v in image.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    encoder |= {
        "norm.weight": image.fc_norm.weight,
        "norm.bias": image.fc_norm.bias,
    }  # an encoder's final norm
    video = build_video_model(
        SIZE, NUM_CLASSES, num_frames=num_frames, tubelet_size=tubelet, release_init=False
    )
    state = inflate_image_state(encoder, num_frames, tubelet) | {
        k: image.state_dict()[k] for k in ("head.weight", "head.bias")
    }
    video.load_state_dict(state)  # strict: every key of the video model comes from the image model
    return video.eval()


def test_one_frame_equals_the_image_model_exactly(image_model):
    video = _video_from_image(image_model, num_frames=1)
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(video(images[:, None]), image_model(images))


def test_identical_frames_equal_the_image_model_with_its_cls_key_weighted_one_in_t(image_model):
    # Joint attention over 8 copies of every patch counts each patch key 8 times and the one CLS key
    # once: the image model with log(1/8) added to its CLS attention logits is the exact reference.
    frames = 8
    video = _video_from_image(image_model, num_frames=frames)
    images = torch.randn(2, 3, 32, 32)
    clips = images[:, None].repeat(1, frames, 1, 1, 1)
    tokens = 1 + (32 // 8) ** 2
    cls_weight = torch.zeros(1, 1, tokens, tokens)
    cls_weight[..., 0] = -math.log(frames)
    reference = image_model.forward_head(
        image_model.forward_features(images, attn_mask=cls_weight), pre_logits=True
    )
    features = video.forward_head(video.forward_features(clips), pre_logits=True)
    assert torch.allclose(features, reference, atol=1e-5)
    # Without the correction the plain image model differs: the test above is not vacuous.
    plain = image_model.forward_head(image_model.forward_features(images), pre_logits=True)
    assert (features - plain).abs().max() > 1e-3


def test_tubelet_kernel_is_repeated_and_divided_so_a_static_clip_embeds_as_the_image(image_model):
    video = _video_from_image(image_model, num_frames=4, tubelet=2)
    assert video.patch_embed.proj.weight.shape == (64, 3, 2, 8, 8)
    assert video.pos_embed.shape == (1, 1 + 2 * 16, 64)
    images = torch.randn(2, 3, 32, 32)
    image_tokens = image_model.patch_embed(images)
    clip_tokens = video.patch_embed(images[:, None].repeat(1, 4, 1, 1, 1))
    assert torch.allclose(clip_tokens, image_tokens.repeat(1, 2, 1), atol=1e-5)


def test_resize_is_the_identity_at_the_same_shape_and_keeps_cls():
    table = torch.randn(1, 1 + 8 * 4 * 4, 16)
    assert torch.equal(resize_pos_embed(table, (8, 4, 4), (8, 4, 4)), table)
    resized = resize_pos_embed(table, (8, 4, 4), (16, 4, 4))
    assert resized.shape == (1, 1 + 16 * 16, 16)
    assert torch.equal(resized[:, 0], table[:, 0])


def test_resize_over_time_is_trilinear_with_half_pixel_centres():
    # Two time slots -> four: sources at t = -0.25, 0.25, 0.75, 1.25 (clamped): weights by hand.
    spatial = torch.randn(1, 4, 3)
    first, second = spatial, spatial + 1.0
    table = torch.cat([torch.zeros(1, 1, 3), first, second], dim=1)
    resized = resize_pos_embed(table, (2, 2, 2), (4, 2, 2))[:, 1:].view(4, 4, 3)
    expected = torch.stack(
        [first[0], 0.75 * first[0] + 0.25 * second[0], 0.25 * first[0] + 0.75 * second[0], second[0]]
    )
    assert torch.allclose(resized, expected, atol=1e-6)


def test_model_resize_changes_frames_and_runs():
    model = build_video_model(SIZE, NUM_CLASSES, num_frames=8)
    model.resize(16)
    assert model.pos_embed.shape == (1, 1 + 16 * 16, 64)
    assert model(torch.randn(1, 16, 3, 32, 32)).shape == (1, NUM_CLASSES)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.randn(1, 8, 3, 32, 32))


def test_weights_folder_round_trip(tmp_path):
    model = build_video_model(SIZE, NUM_CLASSES, num_frames=4, tubelet_size=2).eval()
    save_weights(model, tmp_path, kind="video", arch=video_arch(model), extra={"classes": list("abcde")})
    loaded = load(tmp_path).eval()
    clips = torch.randn(2, 4, 3, 32, 32)
    assert torch.equal(loaded(clips), model(clips))
    assert build_from_arch(video_arch(model)).pos_embed.shape == model.pos_embed.shape


def test_release_video_checkpoint_imports_by_key_map():
    # The release's names and shapes (`EVA-01/video` models/beit.py, 8 frames, tubelet 1), DDP prefix.
    source = build_video_model(SIZE, NUM_CLASSES, num_frames=8).eval()
    raw = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    for block in range(SIZE.depth):  # an MAE-style fused qkv bias in one block, k part zero
        q, v = raw.pop(f"module.blocks.{block}.attn.q_bias"), raw.pop(f"module.blocks.{block}.attn.v_bias")
        raw[f"module.blocks.{block}.attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    state, arch = release_video_state(raw, img_size=32, num_heads=2)
    assert arch == {"size": SIZE.__dict__, "num_classes": NUM_CLASSES, "num_frames": 8, "tubelet_size": 1}
    rebuilt = build_from_arch(arch).eval()
    rebuilt.load_state_dict(state)
    clips = torch.randn(1, 8, 3, 32, 32)
    assert torch.equal(rebuilt(clips), source(clips))


def test_k722_head_rows_are_picked_by_class_name():
    k722 = ["abseiling", "air drumming", "zumba", "juggling balls", "yoga"]
    head = {"head.weight": torch.arange(10.0).view(5, 2), "head.bias": torch.arange(5.0)}
    k400 = ["Yoga", "abseiling", "air_drumming"]
    picked = map_classifier_rows(head, k722, k400)
    assert picked["head.bias"].tolist() == [4.0, 0.0, 1.0]
    assert picked["head.weight"].tolist() == [[8.0, 9.0], [0.0, 1.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match="not in the checkpoint"):
        map_classifier_rows(head, k722, ["surfing"])


def test_a_batch_with_no_readable_clip_trains_nothing_and_does_not_crash():
    """Batch 1 per GPU (the release's recipes): one broken video must not end the run."""
    from flyeva.engine.loop import StepContext
    from flyeva.tasks.video.objective import VideoObjective

    model = build_video_model(SIZE, 3, num_frames=2, tubelet_size=1)
    empty = {"clips": torch.zeros(0, 2, 3, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}
    ctx = StepContext(0, 0, 0, 0, 0, torch.device("cpu"))
    loss, metrics = VideoObjective(3, smoothing=0.1)(model, empty, ctx)
    loss.backward()
    assert loss.item() == 0.0 and metrics == {}
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and not g.any() for g in grads)  # every weight joins, none moves


def test_a_release_video_checkpoint_of_an_unnamed_size_converts_and_loads_with_its_head_count(
    tmp_path, capsys
):
    """Width 40 with 5 heads matches no named size: `convert release --num-heads` and
    `model.num_heads` are the two ways in; without them, one line says which to pass."""
    from dataclasses import replace

    from flyeva.cli import main
    from flyeva.models.weights import load
    from flyeva.tasks.video.convert import load_init

    odd = replace(SIZE, img_size=224, patch_size=16, embed_dim=40, num_heads=5, mlp_dim=80)
    torch.manual_seed(0)
    model = build_video_model(odd, 3, num_frames=2, tubelet_size=1)
    path = tmp_path / "release_video.pth"
    torch.save({"model": model.state_dict()}, path)
    convert = ["convert", "release", str(path), "--out", str(tmp_path / "video")]
    assert main(convert) == 2 and "--num-heads" in capsys.readouterr().err
    assert main([*convert, "--num-heads", "5"]) == 0
    loaded = load(tmp_path / "video")
    assert loaded.blocks[0].attn.num_heads == 5 and loaded.weights_config["kind"] == "video"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    _, arch, kind = load_init(path, 224, num_heads=5)  # `model.num_heads=5` of a video config
    assert kind == "video" and arch["size"]["num_heads"] == 5 and arch["num_frames"] == 2


def test_a_tiled_table_is_blind_to_frame_order_and_the_temporal_term_is_not(image_model):
    from flyeva.tasks.video.model import add_temporal_pos

    video = _video_from_image(image_model, num_frames=4)
    clips = torch.randn(2, 4, 3, 32, 32)
    reversed_clips = clips.flip(1)
    with torch.no_grad():
        blind = (video(clips) - video(reversed_clips)).abs().max()  # joint attention + mean pool: rounding
        tiled = video.pos_embed.clone()
        torch.manual_seed(0)
        add_temporal_pos(video, 0.02)
        seeing = (video(clips) - video(reversed_clips)).abs().max()
    assert blind < 2e-6 and seeing > 5e-5  # (this model's tokens are ~10x a trained one's: a small term)
    added = (video.pos_embed - tiled)[0]
    assert torch.equal(added[0], torch.zeros(SIZE.embed_dim))  # CLS untouched
    per_slot = added[1:].reshape(4, 16, SIZE.embed_dim)  # 4 slots x a 4 x 4 grid
    assert torch.allclose(per_slot, per_slot[:, :1].expand(-1, 16, -1), atol=1e-6)  # one vector per slot
    assert 0.016 < per_slot[:, 0].std().item() < 0.024  # 256 draws of N(0, 0.02)


def test_the_inflation_terms_touch_image_inits_only_and_release_video_files_load_exactly(tmp_path):
    from flyeva.models.eva import build_encoder
    from flyeva.tasks.video.build import ModelSection, build_model

    classes = list("abcde")
    torch.manual_seed(0)
    source = build_video_model(SIZE, NUM_CLASSES, num_frames=4, tubelet_size=2)
    torch.save({"model": source.state_dict()}, tmp_path / "release_video.pth")
    section = ModelSection(
        init=str(tmp_path / "release_video.pth"),
        img_size=32,
        num_frames=4,
        tubelet_size=2,
        num_heads=2,
        temporal_pos_std=0.02,
        tubelet_motion=1.0,
    )
    loaded = build_model(section, classes).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items())
    encoder = build_encoder(SIZE)
    save_weights(encoder, tmp_path / "encoder", kind="encoder", arch={"size": SIZE.__dict__})
    slots = []
    for std in (0.0, 0.02):
        section = ModelSection(
            init=str(tmp_path / "encoder"), num_frames=4, img_size=32, temporal_pos_std=std
        )
        table = build_model(section, classes).pos_embed[0, 1:].detach().reshape(4, 16, SIZE.embed_dim)
        slots.append(table)
    assert torch.equal(slots[0], slots[0][:1].expand(4, -1, -1))  # tiled: every slot the image table
    added = slots[1] - slots[0]
    assert torch.allclose(added, added[:, :1].expand(-1, 16, -1), atol=1e-6)  # one vector per time slot
    assert added.abs().max() > 1e-3
    with pytest.raises(ValueError, match="temporal_pos_std must be >= 0"):
        build_model(ModelSection(size="miniature", temporal_pos_std=-0.1), classes)


def test_the_tubelet_motion_term_keeps_a_static_clip_exact_and_lets_the_kernel_see_motion(image_model):
    from flyeva.tasks.video.model import add_tubelet_motion

    video = _video_from_image(image_model, num_frames=4, tubelet=2)
    inflated = video.patch_embed.proj.weight.clone()
    static = torch.randn(2, 1, 3, 32, 32).expand(-1, 4, -1, -1, -1)
    moving = torch.randn(2, 4, 3, 32, 32)
    swapped = moving[:, [1, 0, 3, 2]]  # the frames of each tubelet in the other order
    with torch.no_grad():
        before = video(static), video(moving), video(swapped)
        assert torch.allclose(before[1], before[2], atol=1e-5)  # equal kernel slices: blind inside a tubelet
        torch.manual_seed(0)
        add_tubelet_motion(video, 1.0)
        after = video(static), video(moving), video(swapped)
    assert torch.allclose(after[0], before[0], atol=1e-5)  # zero-sum over the tubelet's frames
    assert (after[1] - after[2]).abs().max() > 1e-3
    added = video.patch_embed.proj.weight - inflated
    assert torch.allclose(added.sum(dim=2), torch.zeros_like(added[:, :, 0]), atol=1e-6)
    bound = 1 / math.sqrt(3 * 2 * 8 * 8)  # nn.Conv3d's default: uniform(+-1/sqrt(fan_in)), before centring
    assert 0.5 * bound < added.abs().max() <= bound
    single = _video_from_image(image_model, num_frames=4, tubelet=1)
    kernel = single.patch_embed.proj.weight.clone()
    add_tubelet_motion(single, 1.0)
    assert torch.equal(single.patch_embed.proj.weight, kernel)  # one frame per tubelet: nothing to see
