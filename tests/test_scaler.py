"""The release's fp16 loss scaling: hysteresis 2 and minimum scale 1 (docs/recipes.md §3)."""

import pytest
import torch

from flyeva.engine.loop import TrainConfig
from flyeva.engine.scaler import HysteresisGradScaler


def run_pattern(scaler, pattern):
    """One optimizer step per character: 'O' = overflowing gradients, 'C' = clean; the scale after each."""
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.0)
    scales = []
    for kind in pattern:
        value = float("inf") if kind == "O" else 1.0
        scaler.scale((weight * value).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        scales.append(scaler.get_scale())
    return scales


def scaler(**kwargs):
    return HysteresisGradScaler("cpu", **{"init_scale": 8.0, "growth_interval": 3, **kwargs})


def test_hysteresis_two_absorbs_the_first_overflow_and_growth_restores_it():
    # Hand-computed: O absorbed (8), O halves (4), O halves (2), 3 clean double (4) and restore the
    # two lives, O absorbed again (4), O halves (2).
    assert run_pattern(scaler(), "OOOCCCOO") == [8, 4, 2, 2, 2, 4, 4, 2]


def test_hysteresis_one_is_torchs_grad_scaler():
    pattern = "OCCCOOCCCCO"
    reference = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=3)
    assert run_pattern(scaler(hysteresis=1, min_scale=0.0), pattern) == run_pattern(reference, pattern)


def test_scale_never_drops_below_min_scale():
    assert run_pattern(scaler(init_scale=2.0), "OOOO") == [2, 1, 1, 1]


def test_remaining_hysteresis_survives_a_checkpoint():
    first = scaler()
    run_pattern(first, "O")  # one life spent
    state = first.state_dict()
    assert state["hysteresis_left"] == 1 and state["scale"] == 8
    resumed = scaler()
    resumed.load_state_dict(state)
    assert run_pattern(resumed, "O") == [4]  # no life left: this overflow halves


def test_engine_defaults_are_the_releases_and_bad_hysteresis_is_refused():
    cfg = TrainConfig()
    assert (cfg.fp16_init_scale, cfg.fp16_growth_interval, cfg.fp16_hysteresis, cfg.fp16_min_scale) == (
        2.0**16,
        500,
        2,
        1.0,
    )
    with pytest.raises(ValueError, match="hysteresis must be >= 1"):
        HysteresisGradScaler("cpu", hysteresis=0)


def test_fsdp_sharded_scaler_has_the_same_hysteresis(tmp_path):
    import torch.distributed as dist

    from flyeva.engine.scaler import ShardedHysteresisGradScaler

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        sharded = ShardedHysteresisGradScaler("cpu", init_scale=8.0, growth_interval=3)
        assert run_pattern(sharded, "OOOCCCOO") == [8, 4, 2, 2, 2, 4, 4, 2]
    finally:
        dist.destroy_process_group()
