"""The engine's `train` for tests that drive it directly, with the test's train/optim settings as the
recorded run config (a stage's `run_stage` records its whole resolved config instead)."""

from dataclasses import asdict

from flyeva.engine import loop


def train(model, objective, stream, cfg, optim_cfg, **kwargs):
    kwargs.setdefault("run_config", {"train": asdict(cfg), "optim": asdict(optim_cfg)})
    return loop.train(model, objective, stream, cfg, optim_cfg, **kwargs)
