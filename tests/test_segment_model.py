"""Segmentation models: EVA backbone + neck, UperNet, Mask2Former, layer-decay groups, weights round trip."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_encoder

from flyeva.engine.optim import OptimConfig, apply_lr, build_adamw, layer_decay_groups
from flyeva.models.eva import EvaSize, build_encoder
from flyeva.models.weights import load, save_weights
from flyeva.tasks.segment.backbone import EvaBackbone, FeaturePyramidNeck
from flyeva.tasks.segment.mask2former import (
    EvaMask2Former,
    LabelMapMask2FormerLoss,
    LevelwiseDeformableAttention,
    Mask2FormerSection,
    present_classes,
    sample_label_masks,
    semantic_scores,
    transformers_config,
)
from flyeva.tasks.segment.model import (
    ModelSection,
    build_from_arch,
    build_segmenter,
    segmenter_arch,
)
from flyeva.tasks.segment.upernet import EvaUperNet, UperNetSection

TINY = tiny_encoder(32)
TINY_P16 = tiny_encoder(64, patch_size=16)
SMALL_UPERNET = UperNetSection(channels=16, aux_channels=8)
SMALL_M2F = Mask2FormerSection(
    num_queries=6, hidden_dim=32, num_heads=4, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
    train_num_points=64,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_neck_levels_have_strides_4_8_16_32_for_patch_16():
    backbone = EvaBackbone(TINY_P16, [0, 1, 1, 1]).eval()
    levels = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(level.shape) for level in levels] == [
        (2, 32, 16, 24),
        (2, 32, 8, 12),
        (2, 32, 4, 6),
        (2, 32, 2, 3),
    ]
    assert [64 // level.shape[-2] for level in levels] == [4, 8, 16, 32]


def _deconv_2x2_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # out[b, o, 2i + a, 2j + c] = sum_k x[b, k, i, j] * W[k, o, a, c] + bias[o]
    out = torch.einsum("bkij,koac->boiajc", x, weight)
    batch, channels, height, _, width, _ = out.shape
    return out.reshape(batch, channels, 2 * height, 2 * width) + bias.view(1, -1, 1, 1)


def test_neck_matches_a_hand_written_reference():
    neck = FeaturePyramidNeck(8).eval()
    with torch.no_grad():
        norm = neck.up4[1]
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    maps = [torch.randn(2, 8, 3, 5) for _ in range(4)]
    got = neck(maps)
    first, _, _, second = neck.up4
    hidden = _deconv_2x2_reference(maps[0], first.weight, first.bias)
    hidden = (hidden - norm.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        norm.running_var.view(1, -1, 1, 1) + 1e-5
    )
    hidden = hidden * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))  # exact GELU
    expected = [
        _deconv_2x2_reference(hidden, second.weight, second.bias),
        _deconv_2x2_reference(maps[1], neck.up2.weight, neck.up2.bias),
        maps[2],
        maps[3].unfold(2, 2, 2).unfold(3, 2, 2).amax((-1, -2)),  # 2x2 windows, the odd row dropped
    ]
    for level, reference in zip(got, expected):
        torch.testing.assert_close(level, reference, atol=1e-5, rtol=1e-5)
    assert [tuple(level.shape[-2:]) for level in got] == [(12, 20), (6, 10), (3, 5), (1, 2)]


def test_backbone_returns_raw_block_outputs_at_out_indices():
    backbone = EvaBackbone(TINY, [0, 1, 1, 0]).eval()
    images = torch.randn(1, 3, 32, 32)
    encoder = backbone.encoder
    tokens = encoder.patch_embed(images).flatten(1, 2)  # dynamic size: NHWC patches
    tokens = torch.cat([encoder.cls_token.expand(1, -1, -1), tokens], 1) + encoder.pos_embed
    block_outputs = []
    for block in encoder.blocks:
        tokens = block(tokens)
        block_outputs.append(tokens[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2))
    maps = encoder.forward_intermediates(images, indices=[0, 1], norm=False, intermediates_only=True)
    torch.testing.assert_close(maps[0], block_outputs[0])
    torch.testing.assert_close(maps[1], block_outputs[1])
    levels = backbone(images)
    torch.testing.assert_close(levels[2], block_outputs[1])  # the identity level is block 1's output
    torch.testing.assert_close(levels[3], F.max_pool2d(block_outputs[0], 2))


def test_pretrained_encoder_is_resized_to_patch_16_and_the_crop(tmp_path):
    pretrained = build_encoder(
        EvaSize(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
    )
    save_weights(pretrained, tmp_path / "enc", kind="encoder", arch={"size": pretrained_size_dict()})
    cfg = ModelSection(init=str(tmp_path / "enc"), patch_size=16, decoder="upernet", upernet=SMALL_UPERNET)
    model = build_segmenter(cfg, num_classes=3, crop_size=64)
    encoder = model.backbone.encoder
    kernel = F.interpolate(
        pretrained.patch_embed.proj.weight, size=(16, 16), mode="bicubic", align_corners=False
    )
    torch.testing.assert_close(encoder.patch_embed.proj.weight, kernel)
    assert tuple(encoder.pos_embed.shape) == (1, 1 + 16, 32)  # CLS + 4 x 4 grid of the 64 px crop
    torch.testing.assert_close(encoder.pos_embed[:, 0], pretrained.pos_embed[:, 0])
    torch.testing.assert_close(encoder.blocks[1].attn.qkv.weight, pretrained.blocks[1].attn.qkv.weight)
    assert model.backbone.out_indices == [0, 0, 0, 1]  # 2 blocks: evenly spaced, ending at the last
    assert segmenter_arch(model)["encoder"]["patch_size"] == 16


def pretrained_size_dict() -> dict:
    return {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_dim": 64}


def test_upernet_logits_at_input_resolution_and_its_loss():
    model = EvaUperNet(EvaBackbone(TINY, [0, 1, 1, 1]), 5, SMALL_UPERNET)
    images = torch.randn(2, 3, 32, 32)
    labels = torch.randint(0, 5, (2, 32, 32))
    labels[0, :10] = 255
    loss, metrics = model(images, labels)
    model.eval()
    assert tuple(model(torch.randn(1, 3, 40, 24)).shape) == (1, 5, 40, 24)
    model.train()
    features = model.backbone(images)
    decode = F.interpolate(model.decode_head(features), size=(32, 32), mode="bilinear", align_corners=False)
    aux = F.interpolate(model.auxiliary_head(features), size=(32, 32), mode="bilinear", align_corners=False)
    keep = labels != 255  # ignored pixels count 0 in a mean over every pixel (the release's mmseg 0.x)
    nll = -(decode.log_softmax(1).gather(1, labels.clamp(max=4)[:, None])[:, 0] * keep).sum() / keep.numel()
    aux_nll = -(aux.log_softmax(1).gather(1, labels.clamp(max=4)[:, None])[:, 0] * keep).sum() / keep.numel()
    torch.testing.assert_close(loss, nll + 0.4 * aux_nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_aux"], aux_nll.detach(), atol=1e-5, rtol=1e-5)


def test_present_classes_ignore_255_and_labels_past_the_class_count():
    labels = torch.tensor([[[0, 2, 255], [2, 2, 7]]])  # 7 is outside 3 classes: in no mask
    assert [c.tolist() for c in present_classes(labels, num_classes=3)] == [[0, 2]]


def _binary_masks(label, classes):
    return (label[None] == classes[:, None, None]).float()


def test_label_map_points_equal_grid_sample_of_the_binary_masks_out_of_bounds_included():
    label = torch.randint(0, 4, (37, 23))
    label[5:9, :] = 255
    classes = torch.tensor([0, 1, 3, 2, 3])
    points = torch.rand(5, 300, 2) * 1.2 - 0.1  # some beyond the image: zero padding
    points[:, :4] = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5 / 23, 0.5 / 37], [1.0, 0.0]])
    expected = F.grid_sample(
        _binary_masks(label, classes)[:, None], 2 * points[:, :, None] - 1, align_corners=False
    )
    # Equal to the rounding of the pixel coordinate (grid_sample's CPU kernel fuses its multiply-add):
    # a few float32 ulps of 37.
    torch.testing.assert_close(
        sample_label_masks(label, classes, points), expected[:, 0, :, 0], atol=1e-5, rtol=0
    )


def test_label_map_loss_equals_transformers_loss_on_full_resolution_masks():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    config = transformers_config(SMALL_M2F, num_classes=5)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    labels = torch.randint(0, 5, (2, 64, 48))
    labels[0, :20] = 3
    labels[1, 10:30] = 255
    classes = present_classes(labels, 5)
    logits = [torch.randn(2, 6, 16, 12, requires_grad=True) for _ in range(2)]
    scores = [torch.randn(2, 6, 6, requires_grad=True) for _ in range(2)]
    results = []
    for loss, targets in (
        (Mask2FormerLoss(config, weights), [_binary_masks(label, c) for label, c in zip(labels, classes)]),
        (LabelMapMask2FormerLoss(config, weights), list(zip(labels, classes))),
    ):
        torch.manual_seed(3)  # the same random points in both
        terms = loss(logits[1], scores[1], targets, classes, [{"masks_queries_logits": logits[0],
                     "class_queries_logits": scores[0]}])  # fmt: skip
        total = sum(terms.values())
        results.append((terms, torch.autograd.grad(total, logits + scores)))
    (reference, reference_grads), (ours, our_grads) = results
    assert sorted(ours) == sorted(reference) and len(ours) == 6
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=1e-6, rtol=1e-5)
    for mine, theirs in zip(our_grads, reference_grads):
        torch.testing.assert_close(mine, theirs, atol=1e-7, rtol=1e-5)


def test_levelwise_deformable_attention_equals_transformers_with_gradients():
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention as Reference,
    )

    reference = Reference(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
    ours = LevelwiseDeformableAttention(embed_dim=32, num_heads=4, n_levels=3, n_points=4)
    ours.load_state_dict(reference.state_dict())
    for module in (reference, ours):  # offsets of a few pixels, some beyond the border: zero padding
        torch.nn.init.normal_(module.sampling_offsets.weight, std=2.0)
    ours.sampling_offsets.load_state_dict(reference.sampling_offsets.state_dict())
    shapes = [(8, 6), (4, 3), (2, 2)]
    tokens = sum(h * w for h, w in shapes)
    hidden = torch.randn(2, tokens, 32, requires_grad=True)
    position = torch.randn(2, tokens, 32)
    reference_points = torch.rand(2, tokens, 3, 2)
    mask = torch.zeros(2, tokens, dtype=torch.bool)
    mask[1, -3:] = True
    results = []
    for module in (reference, ours):
        out, weights = module(hidden, attention_mask=mask, encoder_hidden_states=hidden,
                              position_embeddings=position, reference_points=reference_points,
                              spatial_shapes_list=shapes)  # fmt: skip
        grads = torch.autograd.grad(out.square().sum(), [hidden, *module.parameters()])
        results.append((out, weights, grads))
    (out_a, weights_a, grads_a), (out_b, weights_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(weights_b, weights_a)
    for mine, theirs in zip(grads_b, grads_a):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_the_mask2former_pixel_decoder_uses_the_levelwise_attention():
    model = EvaMask2Former(EvaBackbone(TINY, [0, 1, 1, 1]), 4, SMALL_M2F)
    layers = model.decode_head.pixel_decoder.encoder.layers
    assert len(layers) == 1 and all(type(layer.self_attn) is LevelwiseDeformableAttention for layer in layers)


def test_semantic_scores_are_softmax_classes_times_sigmoid_masks():
    class_logits, mask_logits = torch.randn(1, 3, 3), torch.randn(1, 3, 2, 2)  # 3 queries, 2 classes + void
    scores = semantic_scores(class_logits, mask_logits)
    probs, masks = class_logits.softmax(-1), mask_logits.sigmoid()
    expected = sum(probs[0, q, 1] * masks[0, q, 1, 0] for q in range(3))
    torch.testing.assert_close(scores[0, 1, 1, 0], expected)
    assert tuple(scores.shape) == (1, 2, 2, 2)


def test_mask2former_forward_backward_with_the_eva_backbone():
    model = EvaMask2Former(EvaBackbone(TINY, [0, 1, 1, 1]), 4, SMALL_M2F)
    assert len(model.decode_head.transformer_module.decoder.layers) == 2
    labels = torch.randint(0, 4, (2, 32, 32))
    labels[1, 5:9] = 255
    loss, metrics = model(torch.randn(2, 3, 32, 32), labels)
    # 3 losses for the final layer + 3 per auxiliary prediction (query-only + 1 intermediate layer)
    assert set(metrics) == {"loss_cross_entropy", "loss_mask", "loss_dice"}
    assert torch.isfinite(loss) and loss > sum(metrics.values())
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert model.backbone.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        scores = model(torch.randn(1, 3, 32, 48))
    assert tuple(scores.shape) == (1, 4, 32, 48) and bool((scores >= 0).all())


def _segmenter(decoder: str, num_classes: int):
    backbone = EvaBackbone(TINY, [0, 1, 1, 1])
    if decoder == "upernet":
        return EvaUperNet(backbone, num_classes, SMALL_UPERNET)
    return EvaMask2Former(backbone, num_classes, SMALL_M2F)


@pytest.mark.parametrize("decoder", ["upernet", "mask2former"])
def test_a_batch_with_no_image_gives_zero_gradients_everywhere_and_keeps_batchnorm_statistics(decoder):
    model = _segmenter(decoder, 4)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms  # the neck's deconvolution norms at least
    before = [{k: v.clone() for k, v in norm.state_dict().items()} for norm in norms]
    loss, metrics = model(torch.empty(0, 3, 32, 32), torch.empty(0, 32, 32, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and all(value.item() == 0.0 for value in metrics.values())
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert [name for name, grad in grads.items() if grad is None] == []
    assert all(bool((grad == 0).all()) for grad in grads.values())
    for norm, state in zip(norms, before):
        assert all(torch.equal(norm.state_dict()[k], v) for k, v in state.items())
        assert norm.momentum == 0.1


@pytest.mark.parametrize("decoder", ["upernet", "mask2former"])
def test_layer_decay_groups_give_the_decoder_the_full_lr(decoder):
    model = _segmenter(decoder, 3)
    groups = layer_decay_groups(model, OptimConfig(weight_decay=0.05, layer_decay=0.9))
    optimizer = build_adamw(groups, OptimConfig(lr=1e-3, implementation="for-loop"))
    apply_lr(optimizer, 1e-3)
    lr_of = {}
    for group, optim_group in zip(groups, optimizer.param_groups):
        for name in group["param_names"]:
            lr_of[name] = (optim_group["lr"], optim_group["weight_decay"])
    depth = 2  # scale = 0.9 ** (depth + 1 - layer): embeddings layer 0, block i layer i + 1
    assert lr_of["backbone.encoder.pos_embed"] == (pytest.approx(1e-3 * 0.9**3), 0.0)
    assert lr_of["backbone.encoder.patch_embed.proj.weight"] == (pytest.approx(1e-3 * 0.9**3), 0.05)
    assert lr_of["backbone.encoder.blocks.0.attn.qkv.weight"][0] == pytest.approx(1e-3 * 0.9**depth)
    assert lr_of["backbone.encoder.blocks.1.mlp.fc1.weight"][0] == pytest.approx(1e-3 * 0.9 ** (depth - 1))
    assert lr_of["backbone.encoder.blocks.1.norm1.weight"][1] == 0.0
    decoder_names = [name for name in lr_of if not name.startswith("backbone.encoder.")]
    assert decoder_names and all(lr_of[name][0] == pytest.approx(1e-3) for name in decoder_names)
    assert len(lr_of) == sum(1 for _ in model.parameters())
    if decoder == "mask2former":  # the release puts these at layer 0 (lr x 0.9 ** 3 here): full lr instead
        for name in (
            "decode_head.transformer_module.queries_embedder.weight",
            "decode_head.transformer_module.level_embed.weight",
            "decode_head.pixel_decoder.level_embed",
        ):
            assert lr_of[name] == (pytest.approx(1e-3), 0.0)


@pytest.mark.parametrize("decoder", ["upernet", "mask2former"])
def test_segmenter_weights_round_trip(tmp_path, decoder):
    cfg = ModelSection(
        size="miniature", patch_size=4, decoder=decoder, upernet=SMALL_UPERNET, mask2former=SMALL_M2F
    )
    model = build_segmenter(cfg, num_classes=3, crop_size=32).eval()
    save_weights(
        model, tmp_path / "seg", kind="segmenter", arch=segmenter_arch(model), extra={"classes": list("abc")}
    )
    loaded = load(tmp_path / "seg").eval()
    assert type(loaded) is type(model) and loaded.weights_config["classes"] == ["a", "b", "c"]
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))
    assert type(build_from_arch(segmenter_arch(model))) is type(model)


def test_init_from_a_segmenter_keeps_all_but_the_class_dependent_weights(tmp_path):
    # The release's ADE20K stage (150 classes) starts from its COCO-Stuff model (171 classes).
    cfg = ModelSection(size="miniature", patch_size=4, decoder="mask2former", mask2former=SMALL_M2F)
    source = build_segmenter(cfg, num_classes=5, crop_size=32)
    save_weights(source, tmp_path / "seg", kind="segmenter", arch=segmenter_arch(source))
    cfg.init = str(tmp_path / "seg")
    model = build_segmenter(cfg, num_classes=3, crop_size=48)
    before, after = source.state_dict(), model.state_dict()
    different = sorted(
        k for k in after if after[k].shape != before[k].shape or not torch.equal(after[k], before[k])
    )
    assert different == [
        "backbone.encoder.pos_embed",  # resized from the 8 x 8 grid to 12 x 12
        "decode_head.class_predictor.bias",
        "decode_head.class_predictor.weight",
        "decode_head.criterion.empty_weight",
    ]
    assert tuple(after["backbone.encoder.pos_embed"].shape) == (1, 1 + 144, 96)


def test_upernet_trains_on_one_image_as_on_a_batch_of_that_image_twice():
    """Batch 1 per GPU: the pooling module's 1x1 BatchNorm would refuse one value per channel. The loss
    and every gradient equal those of a plain batch holding the image twice (both copies labelled)."""
    torch.manual_seed(0)
    model = _segmenter("upernet", 4).train()
    image, label = torch.randn(1, 3, 32, 32), torch.randint(0, 4, (1, 32, 32))
    loss, _ = model(image, label)
    loss.backward()
    one = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    twice, _ = model(torch.cat([image, image]), torch.cat([label, label]))
    twice.backward()
    assert loss.item() == pytest.approx(twice.item(), rel=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(one[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_an_evaluation_that_could_read_no_pair_is_an_error_not_zero_miou(tmp_path):
    """Every validation label missing: mIoU 0.0 would read as a model that learned nothing."""
    from PIL import Image

    from flyeva.tasks.segment.data import DataSection, open_split
    from flyeva.tasks.segment.evaluate import EvalSection, Evaluator

    (tmp_path / "val" / "images").mkdir(parents=True)
    (tmp_path / "val" / "labels").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (32, 32)).save(tmp_path / "val" / "images" / f"{stem}.png")
    pairs = open_split(DataSection(format="folder", root=str(tmp_path), classes=["x", "y", "z"]), "val")
    evaluator = Evaluator(pairs, EvalSection(mode="whole", crop_size=32, scale=[32, 32]))
    with pytest.raises(ValueError, match=r"none of the 2 validation pairs could be read \(first: .*a\.png"):
        evaluator.run(_segmenter("upernet", 3), torch.device("cpu"))
