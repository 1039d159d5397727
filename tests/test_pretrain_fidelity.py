"""Pretraining takes the release's exact optimizer steps, and continues release MIM checkpoints.

The reference loop below is written from the release's formulas (EVA-01/eva: `optim_factory.py`
parameter groups, `utils.cosine_scheduler`, torch AdamW's update, `clip_grad_norm_`, the negative
cosine loss), with none of flyeva's optimizer, schedule or loop helpers.
"""

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from conftest import tiny_encoder
from engine_run import train
from test_engine import ListStream

from flyeva.data.masking import BlockMaskGenerator, generate_masks
from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.models.checkpoint import export_release
from flyeva.models.eva import build_mim_model
from flyeva.pretrain.objective import MIMObjective
from flyeva.pretrain.run import load_init

SIZE = tiny_encoder(16)
STEPS, WARMUP, BATCH, TEACHER_DIM, SEED = 10, 4, 4, 24, 3
PEAK_LR, MIN_LR, WEIGHT_DECAY, CLIP, BETAS, EPS = 2e-3, 1e-5, 0.05, 3.0, (0.9, 0.98), 1e-6


class PatchTeacher(torch.nn.Module):
    """A fixed random projection of each 4x4 patch: deterministic per-token targets."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, TEACHER_DIM)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(7))
        self.requires_grad_(False)

    def forward(self, images):
        return self.proj(F.unfold(images, 4, stride=4).transpose(1, 2))


def release_lr_schedule() -> np.ndarray:
    """`utils.cosine_scheduler(peak, min, epochs=1, niter_per_ep=STEPS, warmup_steps=WARMUP)`."""
    warmup = np.linspace(0, PEAK_LR, WARMUP)
    iters = np.arange(STEPS - WARMUP)
    cosine = [MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * i / len(iters))) for i in iters]
    return np.concatenate((warmup, cosine))


def reference_run(model, batches, masks, teacher):
    """The release's loop: decay unless 1-D, bias or in {pos_embed, cls_token}; clip 3.0; AdamW."""
    params = dict(model.named_parameters())
    decay = {
        n: not (p.ndim == 1 or n.endswith(".bias") or n in ("pos_embed", "cls_token"))
        for n, p in params.items()
    }
    exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
    exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
    lrs = release_lr_schedule()
    for step, (images, mask) in enumerate(zip(batches, masks)):
        predicted = model(images, mask)
        target = teacher(images)[mask]
        loss = -F.cosine_similarity(predicted.float(), target.float(), dim=-1).mean()
        model.zero_grad()
        loss.backward()
        total_norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params.values()))
        clip_coef = min(1.0, CLIP / (float(total_norm) + 1e-6))
        lr = float(lrs[step])
        with torch.no_grad():
            for name, p in params.items():
                grad = p.grad * clip_coef
                t = step + 1
                exp_avg[name].mul_(BETAS[0]).add_(grad, alpha=1 - BETAS[0])
                exp_avg_sq[name].mul_(BETAS[1]).add_(grad * grad, alpha=1 - BETAS[1])
                if decay[name]:
                    p.mul_(1 - lr * WEIGHT_DECAY)
                m_hat = exp_avg[name] / (1 - BETAS[0] ** t)
                v_hat = exp_avg_sq[name] / (1 - BETAS[1] ** t)
                p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
    return model


def test_ten_engine_steps_match_the_release_formulas(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model(SIZE, teacher_dim=TEACHER_DIM, drop_path_rate=0.0)
    reference = copy.deepcopy(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(BATCH, 3, 16, 16, generator=generator) for _ in range(STEPS)]
    masking = BlockMaskGenerator(grid=(4, 4), num_masking_patches=6, min_num_patches=2)
    teacher = PatchTeacher()
    # The masks MIMObjective draws for (seed, epoch, step, micro, rank): fixed inputs of both loops.
    masks = [generate_masks(masking, BATCH, np.random.default_rng([SEED, 0, s, 0, 0])) for s in range(STEPS)]

    cfg = TrainConfig(
        output_dir=str(tmp_path / "run"),
        epochs=1,
        batch_size=BATCH,
        precision="fp32",
        strategy="ddp",
        device="cpu",
        num_workers=0,
        seed=SEED,
        checkpoint_every=1000,
        tensorboard=False,
        progress=False,
    )
    optim = OptimConfig(lr=PEAK_LR, min_lr=MIN_LR, warmup_epochs=WARMUP / STEPS)  # the recipe defaults
    result = train(model, MIMObjective(teacher, masking, 4), ListStream(batches), cfg, optim)
    assert result.step == STEPS
    expected = reference_run(reference, batches, masks, teacher)

    trained = dict(result.model.named_parameters())
    moved = max(float((p - trained[n].detach()).abs().max()) for n, p in initial.items())
    assert moved > 1e-3  # the comparison below is not vacuous
    for name, param in expected.named_parameters():
        torch.testing.assert_close(trained[name], param, rtol=1e-5, atol=1e-6, msg=name)


def test_model_init_continues_a_release_mim_checkpoint(tmp_path, caplog):
    torch.manual_seed(4)
    source = build_mim_model(SIZE, teacher_dim=TEACHER_DIM)
    release_file = export_release(source, tmp_path / "mim.pth")
    target = build_mim_model(SIZE, teacher_dim=TEACHER_DIM)
    with caplog.at_level("INFO"):
        load_init(target, str(release_file))
    for name, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name  # mask_token and lm_head included
    assert "started fresh: nothing" in caplog.text

    other_teacher = build_mim_model(SIZE, teacher_dim=TEACHER_DIM + 8)
    fresh_head = other_teacher.lm_head.weight.detach().clone()
    with caplog.at_level("INFO"):
        load_init(other_teacher, str(release_file))
    assert torch.equal(other_teacher.mask_token, source.mask_token)
    assert torch.equal(other_teacher.lm_head.weight, fresh_head)  # another teacher's width: fresh
    assert "started fresh: lm_head.weight, lm_head.bias" in caplog.text


def test_mask_token_decay_switch():
    model = build_mim_model(SIZE, teacher_dim=TEACHER_DIM)
    assert "mask_token" not in model.no_weight_decay()  # the release decays it
    model.decay_mask_token = False
    assert "mask_token" in model.no_weight_decay()
