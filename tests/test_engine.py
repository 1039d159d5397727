"""The shared training engine on one process: lr of every group, precision, checkpoints, non-finite steps."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_run import train
from torch.utils.data import IterableDataset

from flyeva.engine.checkpoint import assert_finite, list_checkpoints
from flyeva.engine.loop import TrainConfig, TrainingDiverged
from flyeva.engine.optim import OptimConfig, adamw_flags, lr_at, param_groups
from flyeva.models.eva import build_mim_model


class ListStream(IterableDataset):
    """Fixed batches, one worker: enough of the stream contract for engine and task tests."""

    def __init__(self, batches):
        self.batches, self.skip = batches, 0

    def set_epoch(self, epoch, skip=()):
        self.skip = skip[0] if skip else 0

    def num_batches(self, num_workers):
        return len(self.batches)

    def __iter__(self):
        for index in range(self.skip, len(self.batches)):
            batch = self.batches[index]  # images, or (images, labels) for classification
            fields = (
                {"images": batch[0], "labels": batch[1]} if isinstance(batch, tuple) else {"images": batch}
            )
            yield {**fields, "worker": 0, "index": index, "num_skipped": 0}


def regression_objective(model, batch, ctx):
    """A deterministic MIM-shaped objective: every other token masked, fixed targets from the pixels."""
    images = batch["images"]
    mask = (torch.arange(64) % 2 == 0).expand(images.shape[0], -1)
    target = torch.nn.functional.unfold(images, 4, stride=4).transpose(1, 2)[mask]  # [masked, 48] pixels
    predicted = model(images, mask)[:, :48]
    return -torch.nn.functional.cosine_similarity(predicted, target, dim=-1).mean(), {}


def make_batches(count, batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(count)]


def config(tmp_path, **changes):
    base = dict(
        output_dir=str(tmp_path / "run"),
        epochs=1,
        steps_per_epoch=0,
        batch_size=4,
        precision="fp32",
        strategy="ddp",
        device="cpu",
        num_workers=0,
        checkpoint_every=1000,
        keep_last=2,
        resume="never",
        tensorboard=False,
        progress=False,
        log_every=1,
    )
    return TrainConfig(**{**base, **changes})


@pytest.mark.parametrize("explicit_groups", [True, False])
def test_every_group_gets_its_layer_decayed_lr_at_every_step(tmp_path, monkeypatch, explicit_groups):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    optim = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_epochs=2, layer_decay=0.75)
    seen = []
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([(g["layer_id"], g["weight_decay"], g["lr"]) for g in self.param_groups])
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    # Layer decay from the config alone must reach the optimizer, as must explicit groups.
    groups = (lambda m: param_groups(m, 0.05, layer_decay=0.75)) if explicit_groups else None
    train(
        model,
        regression_objective,
        ListStream(make_batches(4)),
        config(tmp_path, epochs=3),
        optim,
        groups_fn=groups,
    )
    assert len(seen) == 12  # 4 steps per epoch x 3 epochs, warmup 8 steps
    depth = 4
    for step, groups_at_step in enumerate(seen):
        if step < 8:
            base = 1e-3 * step / 7  # the release's np.linspace(0, peak, 8): the peak at step 7
        else:
            base = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - 8) / 4))
        layers = sorted({layer for layer, _, _ in groups_at_step})
        assert layers == list(range(depth + 2))  # embeddings 0, blocks 1..4, head 5
        for layer, _, lr in groups_at_step:
            assert lr == pytest.approx(base * 0.75 ** (depth + 1 - layer), rel=1e-12, abs=1e-15)
    # Weight decay off exactly for 1-D params, biases, pos_embed, cls_token; the release decays mask_token.
    for group in param_groups(model, 0.05, layer_decay=0.75):
        for name in group["param_names"]:
            no_decay = name.endswith("bias") or "norm" in name or name in ("pos_embed", "cls_token")
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_lr_schedule_hand_values():
    cosine = OptimConfig(lr=1.0, min_lr=0.1, warmup="linear")
    assert lr_at(0, 100, 10, cosine) == 0.0
    assert lr_at(5, 100, 10, cosine) == 0.5
    assert lr_at(10, 100, 10, cosine) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(100, 100, 10, cosine) == pytest.approx(0.1)


def test_warmup_forms_hand_values():
    """linspace = the release's np.linspace(0, peak, W); open_clip's (s + 1) / W; detectron2's factor."""
    import numpy as np

    linspace = OptimConfig(lr=2.0, min_lr=0.0)
    assert linspace.warmup == "linspace"  # the default: the release's pretraining and fine-tuning
    assert [lr_at(s, 100, 5, linspace) for s in range(5)] == pytest.approx(list(np.linspace(0, 2.0, 5)))
    assert lr_at(3, 100, 5, linspace) == pytest.approx(2.0 * 3 / 4)
    assert lr_at(4, 100, 5, linspace) == lr_at(5, 100, 5, linspace) == pytest.approx(2.0)  # peak twice
    plus_one = OptimConfig(lr=2.0, min_lr=0.0, warmup="linear_plus_one")
    assert [lr_at(s, 100, 4, plus_one) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    factor = OptimConfig(lr=1.0, warmup="factor", warmup_factor=0.001, schedule="step", decay_steps=[8])
    assert lr_at(0, 10, 4, factor) == pytest.approx(0.001)
    assert lr_at(2, 10, 4, factor) == pytest.approx(0.001 + 0.999 * 0.5)
    assert [lr_at(s, 10, 4, factor) for s in (4, 7, 8, 9)] == pytest.approx([1.0, 1.0, 0.1, 0.1])
    # mmseg: the poly schedule runs over every step and the warmup factor multiplies it.
    poly_factor = OptimConfig(lr=1.0, min_lr=0.0, schedule="poly", warmup="factor", warmup_factor=0.1)
    assert lr_at(5, 20, 10, poly_factor) == pytest.approx((1 - 5 / 20) * (0.1 + 0.9 * 0.5))
    assert lr_at(10, 20, 10, poly_factor) == pytest.approx(0.5)


def test_poly_and_constant_schedules_hand_values():
    poly = OptimConfig(lr=1.0, min_lr=0.0, schedule="poly", poly_power=1.0, warmup="linear")
    assert [lr_at(s, 12, 2, poly) for s in (2, 7, 12)] == pytest.approx([1.0, 0.5, 0.0])
    squared = OptimConfig(lr=1.0, min_lr=0.0, schedule="poly", poly_power=2.0, warmup="linear")
    assert lr_at(7, 12, 2, squared) == pytest.approx(0.25)
    constant = OptimConfig(lr=3e-4, schedule="constant", warmup="linear")
    assert [lr_at(s, 100, 4, constant) for s in (2, 4, 99)] == pytest.approx([1.5e-4, 3e-4, 3e-4])


def test_checkpoints_keep_last_k_load_weights_only_and_record_fp16_scaler(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    cfg = config(tmp_path, checkpoint_every=1, keep_last=2, precision="fp16", tensorboard=True)
    result = train(
        model, regression_objective, ListStream(make_batches(5)), cfg, OptimConfig(warmup_epochs=0)
    )
    found = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["checkpoint-000000004.pt", "checkpoint-000000005.pt"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    state = torch.load(found[-1], weights_only=True)
    assert state["run"]["step"] == 5 and state["run"]["skip"] == [5]
    # docs/recipes.md §3: dynamic loss scaling from 2^16 with a growth window of 500.
    assert state["scaler"]["growth_interval"] == 500 and state["scaler"]["scale"] in (65536.0, 32768.0)
    assert set(state["optimizer"]["state"]) == set(range(sum(1 for _ in model.parameters())))
    assert result.step == 5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    assert {"loss", "lr", "loss_scale", "grad_norm", "steps_per_s"} <= records[-2].keys()
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_bf16_autocast_trains_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    before = model.blocks[0].attn.qkv.weight.detach().clone()
    result = train(
        model,
        regression_objective,
        ListStream(make_batches(2)),
        config(tmp_path, precision="bf16"),
        OptimConfig(warmup_epochs=0),
    )
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # master weights stay fp32
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    assert all(math.isfinite(h["loss"]) for h in result.history)


class NaNAt:
    """Wraps an objective and returns a non-finite loss at chosen steps."""

    def __init__(self, steps):
        self.steps = set(steps)

    def __call__(self, model, batch, ctx):
        loss, metrics = regression_objective(model, batch, ctx)
        return (loss * float("nan") if ctx.step in self.steps else loss), metrics


def test_non_finite_loss_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    result = train(model, NaNAt({2, 3}), ListStream(make_batches(6)), config(tmp_path), OptimConfig())
    assert result.nonfinite_steps == 2 and result.step == 6
    assert_finite(model)  # the skipped steps never touched the weights


def test_repeated_non_finite_rolls_back_to_the_last_healthy_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    cfg = config(tmp_path, checkpoint_every=1, keep_last=5, max_consecutive_nonfinite=2)
    result = train(model, NaNAt({2, 3, 4, 5}), ListStream(make_batches(6)), cfg, OptimConfig())
    # Checkpoint 2 holds the weights that met the first non-finite step: it is set aside, and both
    # rollbacks restore checkpoint 1; no checkpoint is written during a streak.
    assert result.nonfinite_steps == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "checkpoint-000000002.pt.nonfinite" in names and "checkpoint-000000003.pt" not in names
    step_one = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint-000000001.pt", weights_only=True)
    final = torch.load(tmp_path / "run" / "checkpoints" / "checkpoint-000000006.pt", weights_only=True)
    assert all(torch.equal(step_one["model"][k], final["model"][k]) for k in final["model"])
    with pytest.raises(TrainingDiverged, match="no checkpoint from before that"):
        train(
            build_mim_model("miniature"),
            NaNAt(set(range(10))),
            ListStream(make_batches(4)),
            config(tmp_path / "b", max_consecutive_nonfinite=2),
            OptimConfig(),
        )


def test_a_checkpoint_with_nan_weights_is_refused():
    model = build_mim_model("miniature")
    with torch.no_grad():
        model.pos_embed[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="pos_embed is not finite"):
        assert_finite(model)


RESUME_CONFIG = """
model: {size: miniature, drop_path_rate: 0.1}
teacher:
  random_init: {image_size: 32, patch_size: 4, width: 32, layers: 1, heads: 2, mlp_ratio: 2.0, output_dim: 16}
mask: {num_masking_patches: 26, min_num_patches: 4}
data:
  sources: [{type: synthetic, num_samples: 192}]
  val: [{type: synthetic, num_samples: 32, seed: 1}]
  max_val_batches: 1
optim: {lr: 1.0e-3, warmup_epochs: 0.5}
train: {epochs: 3, batch_size: 16, precision: fp32, strategy: ddp, device: cpu, num_workers: 1,
        checkpoint_every: 5, keep_last: 2, log_every: 1, tensorboard: false, progress: false}
"""


def _pretrain(config_file: Path, out: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "flyeva.cli",
        "pretrain",
        "--config",
        str(config_file),
        f"train.output_dir={out}",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_gives_bit_identical_weights(tmp_path):
    from safetensors.torch import load_file

    config_file = tmp_path / "resume.yaml"
    config_file.write_text(RESUME_CONFIG)
    reference = _pretrain(config_file, tmp_path / "reference")
    interrupted = _pretrain(config_file, tmp_path / "interrupted")
    checkpoints = tmp_path / "interrupted" / "checkpoints"
    deadline = time.time() + 120
    while (
        not list_checkpoints(checkpoints) or list_checkpoints(checkpoints)[-1].name < "checkpoint-000000015"
    ):
        assert interrupted.poll() is None, interrupted.stderr.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.kill(interrupted.pid, signal.SIGKILL)  # mid-run, between checkpoints, like a lost node
    interrupted.wait()
    assert interrupted.returncode == -signal.SIGKILL
    assert not (tmp_path / "interrupted" / "final").exists()
    resumed = _pretrain(config_file, tmp_path / "interrupted")
    assert resumed.wait(timeout=180) == 0, resumed.stderr.read()
    assert reference.wait(timeout=180) == 0, reference.stderr.read()
    a = load_file(tmp_path / "reference" / "final" / "model.safetensors")
    b = load_file(tmp_path / "interrupted" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    summary = json.loads((tmp_path / "interrupted" / "result.json").read_text())
    assert summary["step"] == 36


def test_model_ema_follows_the_weights_and_is_evaluated(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    snapshots = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    original_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    evaluated = []

    def evaluate(m, ctx):
        evaluated.append(m)
        return {"score": float(m.pos_embed.sum())}

    cfg = config(tmp_path, ema_decay=0.5, checkpoint_every=3)
    result = train(
        model,
        regression_objective,
        ListStream(make_batches(3)),
        cfg,
        OptimConfig(warmup_epochs=0),
        evaluate=evaluate,
    )
    expected = snapshots[0]["pos_embed"]
    for snapshot in snapshots[1:]:  # ema <- 0.5 * ema + 0.5 * weights, after every step
        expected = 0.5 * expected + 0.5 * snapshot["pos_embed"]
    assert torch.allclose(result.ema_model.pos_embed, expected, atol=1e-7)
    assert evaluated == [model, result.ema_model]
    assert result.history[-1]["eval"]["ema_score"] == pytest.approx(float(expected.sum()), rel=1e-5)
    saved = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1], weights_only=True)
    assert torch.equal(saved["ema"]["pos_embed"], result.ema_model.pos_embed)


def _trained_weights(tmp_path, name, optim_cfg, **changes):
    torch.manual_seed(0)
    model = build_mim_model("miniature", drop_path_rate=0.0)
    cfg = config(tmp_path / name, **changes)
    train(model, regression_objective, ListStream(make_batches(3)), cfg, optim_cfg)
    # One process: the engine trains `model` itself, compiled in place when asked.
    assert (model._compiled_call_impl is not None) == cfg.compile
    return model.state_dict()


@pytest.mark.parametrize("implementation", ["foreach", "for-loop"])
def test_fused_adamw_default_matches_torchs_other_implementations(tmp_path, implementation):
    assert OptimConfig().implementation == "fused"
    fused = _trained_weights(tmp_path, "fused", OptimConfig(warmup_epochs=0))
    other = _trained_weights(
        tmp_path, implementation, OptimConfig(warmup_epochs=0, implementation=implementation)
    )
    assert max((fused[k] - other[k]).abs().max().item() for k in fused) < 1e-5


def test_unknown_adamw_implementation_names_the_choices():
    expected = r"optim.implementation='fast' is not one of \['for-loop', 'foreach', 'fused'\]"
    with pytest.raises(ValueError, match=expected):
        adamw_flags("fast")


def test_compiled_model_trains_like_eager(tmp_path):
    optim_cfg = OptimConfig(warmup_epochs=0)
    eager = _trained_weights(tmp_path, "eager", optim_cfg)
    compiled = _trained_weights(tmp_path, "compiled", optim_cfg, compile=True)
    # Same parameter names (compiled in place), same update to fp32 rounding of fused kernels.
    assert eager.keys() == compiled.keys()
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-4


KEEP_PROBE = """
import ctypes
from flyeva.engine.loop import keep_freed_memory
assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20  # over glibc's largest mmap threshold (32 MiB): mapped on its own by default
before = libc.sbrk(0)
block = libc.malloc(size)
ctypes.memset(block, 1, size)
grown = libc.sbrk(0)
libc.free(block)
print(grown - before, grown - libc.sbrk(0))
"""


def test_keep_freed_memory_keeps_a_freed_block_in_the_heap():
    if sys.platform != "linux":
        pytest.skip("glibc's mallopt is Linux-only")
    # A 64 MiB block must come from the heap and stay there once freed. By default glibc maps it on
    # its own and unmaps it on free; the old trim threshold 2**34, wrapped to 0 by a C int, trimmed it.
    out = subprocess.run([sys.executable, "-c", KEEP_PROBE], capture_output=True, text=True, check=True)
    grown, returned = map(int, out.stdout.split())
    # Served by the heap: it grew by about 64 MiB (less whatever free space its top already had).
    assert grown > 48 * 2**20 and returned == 0
