"""Installed as users install it: a wheel built from the repository, not the source tree, runs a stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_a_built_wheel_without_the_source_tree_runs_a_miniature_stage(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", wheels, ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("flyeva-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
        check=True,
        capture_output=True,
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [sys.executable, "-c", "import flyeva; print(flyeva.__file__)"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not src/
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "flyeva.cli", "classify", "finetune", f"train.output_dir={out}",
        "train.max_steps=1", "train.batch_size=8", "train.num_workers=0", "train.device=cpu",
        "train.progress=false", "train.tensorboard=false",
        "data.train=[{type: shapeworld, num_samples: 16, image_size: 32}]",
        "data.val=[{type: shapeworld, num_samples: 8, image_size: 32, seed: 1}]",
    ]  # fmt: skip
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads((out / "result.json").read_text())
    assert record["stage"] == "classify finetune" and record["step"] == 1
    for stage in ("pretrain", "detect train", "segment train", "video train", "clip train"):
        shown = subprocess.run(
            [sys.executable, "-m", "flyeva.cli", *stage.split(), "--print-config"],
            cwd=tmp_path, env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert shown.returncode == 0 and "output_dir" in shown.stdout, (stage, shown.stderr[-500:])
