"""The stage contract (flyeva.engine.stage): every stage is run, recorded and resumed the same way."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET_RUN as QUIET

from flyeva.cli import main
from flyeva.engine.checkpoint import list_checkpoints

SRC = Path(__file__).parents[1] / "src" / "flyeva"
SHAPES = "{type: shapeworld, num_samples: 16, image_size: 32, seed: 0}"
TEACHER = (
    "teacher.random_init={image_size: 32, patch_size: 4, width: 32, layers: 1, heads: 2, mlp_ratio: 2.0, "
    "output_dim: 16}"
)
# (command, tiny overrides that train one or two steps, a changed model.* key, a changed data.* key)
STAGES = {
    "pretrain": (
        ["pretrain"],
        ["teacher.path=''", "teacher.train_recipe=''", TEACHER, f"data.sources=[{SHAPES}]", "data.val=[]",
         "train.epochs=1", "train.batch_size=8", "train.max_steps=1"],
        "model.drop_path_rate=0.0",
        "data.hflip=0.0",
    ),
    "classify finetune": (
        ["classify", "finetune"],
        [f"data.train=[{SHAPES}]", f"data.val=[{SHAPES}]", "train.batch_size=8", "train.epochs=1",
         "train.max_steps=1"],
        "model.drop_path_rate=0.1",
        "data.crop_pct=0.875",
    ),
    "classify linprobe": (
        ["classify", "linprobe"],
        ["model.init=''", "model.size=miniature", f"data.train=[{SHAPES}]", f"data.val=[{SHAPES}]",
         "train.batch_size=8", "train.epochs=1", "train.max_steps=1"],
        "model.img_size=48",
        "data.crop_pct=0.875",
    ),
    "clip": (
        ["clip", "train"],
        [f"data.sources=[{SHAPES}]", "zeroshot.during_training=false", "train.batch_size=8", "train.epochs=1",
         "train.max_steps=1", "loss.micro_batch_size=0"],
        "model.embed_dim=32",
        "data.hflip=0.5",
    ),
    "detect": (
        ["detect", "train"],
        ["data.shapeworld_train=8", "data.shapeworld_val=0", "data.shapeworld_size=32", "model.img_size=32",
         "model.window=4", "model.anchor_sizes=[8,16,32,64]", "test.size=32", "train.batch_size=4",
         "train.max_steps=1", "model.mask_dims=[16]", "model.box_fc_dims=[32]", "model.out_channels=16"],
        "model.drop_path_rate=0.2",
        "data.flip=0.0",
    ),
    "segment": (
        ["segment", "train"],
        ["data.shapeworld_train=8", "data.shapeworld_val=2", "model.patch_size=8",
         "model.upernet.channels=16", "model.upernet.aux_channels=8", "train.batch_size=4",
         "train.steps_per_epoch=1", "train.epochs=1", "optim.warmup_steps=1"],
        "model.drop_path_rate=0.2",
        "aug.flip=0.0",
    ),
    "video": (
        ["video", "train"],
        ["data.train.num_samples=8", "data.val.num_samples=2", "model.num_frames=4", "train.batch_size=4",
         "train.epochs=1", "train.max_steps=1"],
        "model.drop_path_rate=0.1",
        "data.short_side=40",
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_resume_that_changes_model_or_data_is_refused_in_every_stage(stage, tmp_path, capsys):
    command, tiny, changed_model, changed_data = STAGES[stage]
    out = tmp_path / "run"
    args = [*command, *QUIET, *tiny, f"train.output_dir={out}"]
    assert main(args) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["stage"] == stage and record["verb"] == "train" and record["step"] >= 1
    assert record["weights"] == str(out / "final") and (out / "final" / "model.safetensors").is_file()
    assert set(record) == {
        "stage", "verb", "run_id", "step", "metrics", "final", "best", "best_ema", "evaluations", "weights",
        "counts", "facts", "details",
    }  # fmt: skip
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0  # any stage's run
    report = (tmp_path / "report" / "report.md").read_text()
    for name in record["metrics"]:  # the evaluation of the last step, from result.json
        assert f"eval {name}" in report, name
    config_before = (out / "config.yaml").read_text()
    for change in (changed_model, changed_data):
        capsys.readouterr()
        assert main([*args, change]) == 2
        error = capsys.readouterr().err
        key = change.split("=")[0]
        assert "with another config" in error and key in error, error
        assert error.count("\n") == 1  # one line, no traceback
        assert (out / "config.yaml").read_text() == config_before  # the refused run changed nothing
    assert main(args) == 0  # the same settings resume (the run is complete: it ends at once)


class ToyObjective:
    handles_backward = False
    input_key = "images"

    def __call__(self, model, batch, ctx):
        loss = (model(batch["images"]) - batch["targets"]).pow(2).mean()
        return loss, {}


TOY_RUN = """
from dataclasses import dataclass, field

import torch

from flyeva.engine.loop import TrainConfig
from flyeva.engine.optim import OptimConfig
from flyeva.engine.stage import Built, MetricsEvaluator
from flyeva.models.weights import save_weights
from test_stages import ToyObjective, ToyStream


def toy_optim():
    return OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, schedule="constant")


@dataclass
class ToyConfig:
    scale: float = 2.0
    optim: OptimConfig = field(default_factory=toy_optim)
    train: TrainConfig = field(default_factory=TrainConfig)


def build(cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    x = torch.linspace(-1, 1, 8)[:, None]

    def neg_loss(m, ctx):
        return {"neg_loss": -float((m(x) - cfg.scale * x).pow(2).mean())}

    def save(state, folder):
        return save_weights(state, folder, kind="toy", arch={})

    return Built(model, ToyObjective(), ToyStream(cfg.scale), save, evaluator=MetricsEvaluator(neg_loss))
"""


class ToyStream(torch.utils.data.IterableDataset):
    """Four batches of y = scale * x; `worker` and `index` make resume exact, as the engine asks."""

    def __init__(self, scale: float):
        self.scale = scale

    def set_epoch(self, epoch, skip=None):
        pass

    def num_batches(self, num_workers):
        return 4

    def __iter__(self):
        x = torch.linspace(-1, 1, 8)[:, None]
        for index in range(4):
            yield {"images": x, "targets": self.scale * x, "worker": 0, "index": index}


def test_a_stage_in_one_new_folder_runs_with_no_edit_to_the_engine_or_the_cli(tmp_path, monkeypatch, capsys):
    """A task package dropped into flyeva/tasks/ (here: a folder on the package's path) is a CLI command."""
    out = tmp_path / "run"
    overrides = [*_toy_stage(tmp_path, monkeypatch), f"train.output_dir={out}", "train.epochs=20",
                 "train.checkpoint_every=1000"]  # fmt: skip
    assert main(["toy", "train", *overrides]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["stage"] == "toy" and record["step"] == 80  # 20 epochs x 4 batches
    assert len(record["evaluations"]) == 20 and record["metrics"]["neg_loss"] > -1e-3  # y = 2x is learned
    assert "toy: finished at step 80" in capsys.readouterr().out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("flyeva")}


def test_no_task_imports_another_task_except_the_demo():
    crossing = []
    for task in sorted(p for p in (SRC / "tasks").iterdir() if (p / "__init__.py").is_file()):
        if task.name == "demo":  # the demo runs every task by design
            continue
        for path in task.rglob("*.py"):
            for name in _imports(path):
                parts = name.split(".")
                if parts[:2] == ["flyeva", "tasks"] and len(parts) > 2 and parts[2] != task.name:
                    crossing.append(f"{path.relative_to(SRC)} imports {name}")
    assert not crossing, "\n".join(crossing)


def test_layers_import_downward_only():
    """engine, models, data, teachers and eval never import a task (eval never the engine's stages)."""
    below = ("engine", "models", "data", "teachers", "eval", "pretrain")
    upward = [
        f"{path.relative_to(SRC)} imports {name}"
        for layer in below
        for path in (SRC / layer).rglob("*.py")
        for name in _imports(path)
        if name.startswith("flyeva.tasks")
    ]
    assert not upward, "\n".join(upward)


def _toy_run(tmp_path, evaluate, **changes):
    from engine_run import train
    from test_engine import config

    from flyeva.engine.optim import OptimConfig

    torch.manual_seed(0)
    cfg = config(tmp_path, epochs=2, resume="auto", **changes)
    optim = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, schedule="constant")
    return train(torch.nn.Linear(1, 1), ToyObjective(), ToyStream(2.0), cfg, optim, evaluate=evaluate)


def test_a_signal_during_an_evaluation_writes_the_checkpoint_of_that_step(tmp_path):
    """SIGTERM while the epoch-end evaluation runs: the evaluation ends, then step 4 is checkpointed."""
    import os
    import signal

    from flyeva.engine.checkpoint import list_checkpoints
    from flyeva.engine.preemption import Interrupted

    def evaluate(model, ctx):
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's preemption notice, mid-evaluation
        return {"neg_loss": 0.0}

    with pytest.raises(Interrupted) as stopped:
        _toy_run(tmp_path, evaluate)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-000000004.pt"]
    assert "checkpoint-000000004.pt written" in str(stopped.value)
    result = _toy_run(tmp_path, lambda model, ctx: {"neg_loss": 0.0})  # the same command resumes
    # The evaluation that finished before the stop stays in the run's record.
    assert result.step == 8 and [h["step"] for h in result.history if "eval" in h] == [4, 8]


def test_a_checkpoint_of_another_model_is_an_error_never_a_fresh_start(tmp_path, capsys):
    """A checkpoint that does not fit the model stops the run; nothing in the folder changes."""
    from flyeva.engine.checkpoint import CheckpointMismatchError

    _toy_run(tmp_path, None)
    (tmp_path / "run" / "run.json").unlink()  # an older folder without a manifest: only the weights can tell
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    from engine_run import train
    from test_engine import config

    from flyeva.engine.optim import OptimConfig

    cfg = config(tmp_path, epochs=2, resume="auto")
    with pytest.raises(CheckpointMismatchError, match="does not fit this model"):
        train(torch.nn.Linear(1, 2), ToyObjective(), ToyStream(2.0), cfg, OptimConfig(warmup_steps=0))
    after = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    assert set(before) <= set(after) and not (tmp_path / "run" / "final").exists()


def test_an_evaluation_verb_takes_the_folder_of_a_running_training(tmp_path, capsys):
    """`segment eval` into a folder a training run holds: refused with one line, nothing written."""
    from flyeva.engine.run import RunLock

    folder = tmp_path / "busy"
    with RunLock.hold(folder):
        code = subprocess_main(["segment", "eval", f"train.output_dir={folder}", "weights=missing"], tmp_path)
        assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # the refused verb wrote nothing
    assert code.returncode == 2 and "in use by another flyeva run" in code.stderr, code.stderr


def subprocess_main(argv, cwd):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "flyeva.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_a_run_that_cannot_read_most_of_its_data_stops_without_weights(tmp_path, capsys):
    """6 of 8 images unreadable: one line naming the count, exit 2, no final/ (the rest would train)."""
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    for index in range(2):
        Image.new("RGB", (32, 32), (40 * index, 90, 200)).save(data / f"good_{index}.png")
    for index in range(6):
        (data / f"broken_{index}.jpg").write_bytes(b"not an image")
    _, tiny, _, _ = STAGES["pretrain"]
    out = tmp_path / "run"
    source = f"data.sources=[{{type: folder, path: {data}}}]"
    args = ["pretrain", *QUIET, *tiny, source, "train.batch_size=4", f"train.output_dir={out}"]
    assert main([*args, "train.max_steps=2"]) == 2
    error = capsys.readouterr().err
    last = error.strip().splitlines()[-1]  # the warnings above it name the unreadable files
    assert last.startswith("flyeva: error: epoch 0: 6 of 8 training samples were unreadable"), error
    assert not (out / "final").exists() and not (out / "result.json").exists()


def test_the_logged_loss_is_the_mean_since_the_last_record(tmp_path):
    """log_every=4: each record's loss is the mean of its 4 steps' losses, not the 4th step's alone."""
    seen = []

    class Recording(ToyObjective):
        def __call__(self, model, batch, ctx):
            loss, metrics = super().__call__(model, batch, ctx)
            seen.append(float(loss))
            return loss, metrics

    from engine_run import train
    from test_engine import config

    from flyeva.engine.optim import OptimConfig

    torch.manual_seed(0)
    cfg = config(tmp_path, epochs=2, log_every=4)
    optim = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, schedule="constant")
    train(torch.nn.Linear(1, 1), Recording(), ToyStream(2.0), cfg, optim)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(seen) == 8 and len(logged) == 2
    assert logged == pytest.approx([sum(seen[:4]) / 4, sum(seen[4:]) / 4], rel=1e-12)


def _toy_stage(tmp_path: Path, monkeypatch) -> list[str]:
    """The toy stage of the test above, registered; returns its overrides (one short run)."""
    package = tmp_path / "toy"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from flyeva.engine.stage import Stage\n"
        "HELP = 'a toy regression'\n"
        "STAGES = (Stage(command='toy', help='fit y = 2x', config='flyeva.tasks.toy.run:ToyConfig',\n"
        "                build='flyeva.tasks.toy.run:build', primary='neg_loss'),)\n"
    )
    (package / "run.py").write_text(TOY_RUN)
    import flyeva.tasks

    monkeypatch.setattr(flyeva.tasks, "__path__", [*flyeva.tasks.__path__, str(tmp_path)])
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr("flyeva.config.CONFIG_ROOT", tmp_path / "configs")
    (tmp_path / "configs" / "toy").mkdir(parents=True)
    (tmp_path / "configs" / "toy" / "miniature.yaml").write_text("scale: 2.0\n")
    return [*QUIET, "train.epochs=2", "train.batch_size=8", "train.precision=fp32", "train.strategy=ddp"]


def test_a_full_disk_at_the_final_weights_is_one_line_and_the_rerun_finishes(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError

    overrides = [*_toy_stage(tmp_path, monkeypatch), f"train.output_dir={tmp_path / 'run'}"]

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr("flyeva.models.weights.save_file", full_disk)
        assert main(["toy", "train", *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "run the same command again" in err[0]
    assert not (tmp_path / "run" / "final").exists() or not list((tmp_path / "run" / "final").iterdir())
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["checkpoint-000000008.pt"]
    assert main(["toy", "train", *overrides]) == 0  # resumes at its last step: nothing is trained twice
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["step"] == 8 and (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("where", ["a_file", "a_file/below"])
def test_an_output_dir_that_is_a_file_is_one_line_and_the_file_stays(tmp_path, monkeypatch, capsys, where):
    overrides = _toy_stage(tmp_path, monkeypatch)
    (tmp_path / "a_file").write_text("keep me\n")
    assert main(["toy", "train", *overrides, f"train.output_dir={tmp_path / where}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "as the output folder" in err[0] and "train.output_dir" in err[0]
    assert (tmp_path / "a_file").read_text() == "keep me\n"
