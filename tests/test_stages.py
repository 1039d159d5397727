"""The stage contract (flyeva.engine.stage): every stage is run, recorded and resumed the same way."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUIET_RUN as QUIET

from flyeva.cli import main

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
    out = tmp_path / "run"
    overrides = [*QUIET, f"train.output_dir={out}", "train.epochs=20", "train.batch_size=8",
                 "train.precision=fp32", "train.strategy=ddp", "train.checkpoint_every=1000"]  # fmt: skip
    monkeypatch.setattr("flyeva.config.CONFIG_ROOT", tmp_path / "configs")
    (tmp_path / "configs" / "toy").mkdir(parents=True)
    (tmp_path / "configs" / "toy" / "miniature.yaml").write_text("scale: 2.0\n")
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
