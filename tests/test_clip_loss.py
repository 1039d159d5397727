"""EVA-CLIP's contrastive objective on one process: accumulation, padding masks, the temperature."""

import math

import pytest
import torch
import torch.nn.functional as F
from clip_dist_worker import CONTEXT, BackwardContext, global_batch, tiny_clip

from flyeva.tasks.clip.objective import ClipObjective, GatheredClipLoss
from flyeva.tasks.clip.zeroshot import tokenizer_for


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def hand_clip_loss(image_features, text_features, scale) -> torch.Tensor:
    """CLIP's symmetric cross-entropy, written out."""
    logits = scale * image_features @ text_features.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@pytest.mark.parametrize("micro_batch_size", [3, 4])
def test_accumulated_micro_batches_give_the_gradients_of_one_large_batch(micro_batch_size):
    batch = global_batch()
    reference = tiny_clip()
    tokens = tokenizer_for(CONTEXT)(batch["texts"])
    image_features, text_features, scale = reference(batch["images"], tokens)
    loss = hand_clip_loss(image_features, text_features, scale)
    loss.backward()

    model = tiny_clip()
    got, metrics = ClipObjective(tokenizer_for(CONTEXT), micro_batch_size)(model, batch, BackwardContext())
    assert float(got) == pytest.approx(float(loss.detach()), abs=1e-6)
    assert metrics["pairs"] == 8
    expected = gradients(reference)
    actual = gradients(model)
    assert set(actual) == set(expected)
    assert set(expected) == {name for name, _ in model.named_parameters()}  # every weight gets a gradient
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    # open_clip's accumulation gives logit_scale (8 / micro) times this gradient; ours gives it once.
    assert abs(float(expected["logit_scale"])) > 1e-4


def test_cached_pass_and_gradient_pass_draw_the_same_drop_paths():
    """With drop path, the gradient is that of the loss of the features the cached pass computed."""
    batch = global_batch()
    tokens = tokenizer_for(CONTEXT)(batch["texts"])
    reference = tiny_clip(drop_path_rate=0.5)
    torch.manual_seed(123)  # chunks run in order from one RNG state, as in the cached pass
    outputs = [reference(batch["images"][i : i + 4], tokens[i : i + 4]) for i in (0, 4)]
    loss = hand_clip_loss(
        torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2]
    )
    loss.backward()
    after_reference = torch.get_rng_state()

    model = tiny_clip(drop_path_rate=0.5)
    torch.manual_seed(123)
    got, _ = ClipObjective(tokenizer_for(CONTEXT), 4)(model, batch, BackwardContext())
    assert float(got) == pytest.approx(float(loss.detach()), abs=1e-6)
    for name, grad in gradients(reference).items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)
    # The RNG continues as after one pass over the batch, not rewound.
    assert torch.equal(torch.get_rng_state(), after_reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_drop_path_replay_on_cuda_matches_one_pass_over_the_chunks():
    device = torch.device("cuda")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in global_batch().items()}
    tokens = tokenizer_for(CONTEXT)(batch["texts"]).to(device)
    reference = tiny_clip(drop_path_rate=0.5).to(device)
    torch.manual_seed(7)
    outputs = [reference(batch["images"][i : i + 4], tokens[i : i + 4]) for i in (0, 4)]
    loss = hand_clip_loss(
        torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs]), outputs[0][2]
    )
    loss.backward()
    model = tiny_clip(drop_path_rate=0.5).to(device)
    torch.manual_seed(7)
    got, _ = ClipObjective(tokenizer_for(CONTEXT), 4)(model, batch, BackwardContext())
    assert float(got) == pytest.approx(float(loss.detach()), abs=1e-5)
    for name, grad in gradients(reference).items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-4, rtol=1e-3, msg=name)


def test_padding_rows_are_masked_out_of_the_loss():
    generator = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    texts = F.normalize(torch.randn(5, 8, generator=generator), dim=-1)
    scale = torch.tensor(10.0)
    padded = GatheredClipLoss()(images, texts, scale, valid_counts=[3])
    expected = hand_clip_loss(images[:3], texts[:3], scale)
    assert float(padded) == pytest.approx(float(expected), abs=1e-6)
    assert float(GatheredClipLoss()(images, texts, scale)) == pytest.approx(
        float(hand_clip_loss(images, texts, scale)), abs=1e-6
    )


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100():
    model = tiny_clip()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(250.0))
    _, metrics = ClipObjective(tokenizer_for(CONTEXT))(model, global_batch(), BackwardContext())
    assert metrics["logit_scale"] == pytest.approx(100.0, rel=1e-6)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0), rel=1e-7)


def test_mismatched_images_and_texts_are_refused():
    batch = global_batch()
    batch["texts"] = batch["texts"][:5]
    with pytest.raises(ValueError, match="8 images but 5 texts"):
        ClipObjective(tokenizer_for(CONTEXT))(tiny_clip(), batch, BackwardContext())
