"""`flyeva report` on real runs: two 4-step `flyeva clip train` runs that differ in their learning rate."""

import argparse
import json
import shutil

import pytest
import torch
from PIL import Image

from flyeva import cli
from flyeva.cli import main
from flyeva.tasks.report import register, report_hint
from flyeva.tasks.report.plots import plot_runs
from flyeva.tasks.report.runs import read_run
from flyeva.tasks.report.summary import fmt, make_report

STEPS = 4


def clip_run(out, lr: str) -> list[str]:
    return [
        "clip",
        "train",
        f"train.output_dir={out}",
        f"optim.lr={lr}",
        f"train.max_steps={STEPS}",
        "train.batch_size=16",
        "loss.micro_batch_size=0",
        "data.sources=[{type: shapeworld, num_samples: 64, image_size: 32}]",
        "zeroshot.datasets=[{name: shapes, type: shapeworld, num_samples: 40, image_size: 32, seed: 1000}]",
        "zeroshot.templates=['a large {}']",
        "model.embed_dim=32",
        "model.text.width=32",
        "train.log_every=1",
        "train.num_workers=0",
        "train.device=cpu",
        "train.tensorboard=false",
        "train.progress=false",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    torch.set_num_threads(1)
    for name, lr in (("slow", "1e-4"), ("fast", "5e-4")):
        assert main(clip_run(root / name, lr)) == 0
    return root / "slow", root / "fast"


def logged(folder, kind=None):
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind in (None, r["kind"])]


def test_summary_numbers_equal_the_log_and_pngs_are_images(runs):
    slow = runs[0]
    report = make_report([slow])
    train, evals = logged(slow, "train"), logged(slow, "eval")
    times = [r["time"] for r in logged(slow)]
    losses = [r["loss"] for r in train]
    expected = {
        "steps": STEPS,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "lowest_loss": min(losses),
        "final_lr": train[-1]["lr"],
        "wall_s": max(times) - min(times),
        "mean_steps_per_s": sum(r["steps_per_s"] for r in train) / len(train),
        "images": 64,
        "skipped_inputs": 0,
        "skipped_steps_logged": 0,
        "nonfinite_steps": 0,
        "eval zeroshot_shapes_top1": evals[-1]["zeroshot_shapes_top1"],
        "eval average_top1": evals[-1]["average_top1"],
    }
    assert len(train) == STEPS and report.facts["slow"] == pytest.approx(expected, rel=1e-12)
    markdown = report.markdown.read_text()
    assert f"| loss, last logged | {fmt(losses[-1])} |" in markdown
    assert f"| learning rate, last logged | {fmt(train[-1]['lr'])} |" in markdown
    assert "pass `--recipe TASK/NAME`" in markdown  # one run, nothing to compare with
    names = sorted(p.name for p in report.plots)
    assert names == ["eval.png", "grad_norm.png", "loss.png", "lr.png", "throughput.png"]
    for path in report.plots:
        assert path.parent == slow / "report" and f"]({path.name})" in markdown
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == ((1200, 360) if path.name == "eval.png" else (600, 360))  # 2 eval panels


def test_plots_show_the_logged_values_of_every_run(runs, tmp_path):
    plots = {p.path.stem: p for p in plot_runs([read_run(f) for f in runs], tmp_path)}
    for folder in runs:
        train = logged(folder, "train")
        loss_steps, losses = plots["loss"].series[folder.name]["loss"]
        assert loss_steps == [1, 2, 3, 4] and losses == [r["loss"] for r in train]
        assert plots["lr"].series[folder.name]["lr"][1] == [r["lr"] for r in train]
        top1 = plots["eval"].series[folder.name]["zeroshot_shapes_top1"]
        assert top1 == ([STEPS], [logged(folder, "eval")[-1]["zeroshot_shapes_top1"]])


def test_two_runs_are_overlaid_and_their_configs_diffed(runs, tmp_path):
    report = make_report(list(runs), tmp_path / "compare")
    markdown = report.markdown.read_text()
    assert "## Config against run slow" in markdown
    assert "| `optim.lr` | 0.0001 | 0.0001 | 0.0005 |" in markdown
    assert f"| `train.output_dir` | {runs[0]} | {runs[0]} | {runs[1]} |" in markdown
    assert "`model.embed_dim`" not in markdown  # equal in both runs
    assert report.facts["fast"]["final_lr"] == logged(runs[1], "train")[-1]["lr"]


def test_config_against_the_recipe_lists_what_the_run_changed(runs, tmp_path):
    markdown = make_report([runs[0]], tmp_path, recipe="clip/miniature").markdown.read_text()
    assert "## Config against clip/miniature" in markdown
    assert "| `optim.lr` | 0.001 | 0.0001 |" in markdown  # the miniature recipe's 1.0e-3
    assert "| `train.batch_size` | 64 | 16 |" in markdown
    assert "`optim.weight_decay`" not in markdown  # the recipe's 0.05, unchanged
    assert "`zeroshot.during_training`" not in markdown


def test_skipped_steps_skipped_inputs_and_a_torn_line_are_counted(runs, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(runs[0], folder, ignore=shutil.ignore_patterns("final", "checkpoints", "report"))
    with open(folder / "metrics.jsonl", "a") as log:
        log.write(
            json.dumps(
                {"kind": "train", "step": 5, "time": 1.0e10, "loss": None, "lr": 1e-4, "skipped": True}
            )
        )
        log.write(
            "\n" + json.dumps({"kind": "epoch", "step": 5, "time": 1.0e10, "images": 16, "skipped_images": 3})
        )
        log.write('\n{"kind": "train", "step": 6, "lo')  # killed mid-write
    report = make_report([folder], tmp_path / "out")
    facts = report.facts["damaged"]
    assert (facts["steps"], facts["skipped_steps_logged"], facts["skipped_inputs"], facts["images"]) == (
        5,
        1,
        3,
        80,
    )
    assert facts["final_loss"] == logged(runs[0], "train")[-1]["loss"]  # a null loss is not a value
    assert "Unreadable metrics.jsonl lines skipped: damaged: 1." in report.markdown.read_text()


def test_flyeva_cli_runs_the_command_and_turns_a_wrong_folder_into_exit_code_2(runs, tmp_path, capsys):
    assert cli.main(["report", str(runs[0]), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert cli.main(["report", str(tmp_path / "r")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_command_hint_and_missing_log(runs, tmp_path):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cli")])
    args.func(args)
    assert (tmp_path / "cli" / "report.md").is_file() and (tmp_path / "cli" / "loss.png").is_file()
    assert report_hint("runs/x") == "see the report: flyeva report runs/x"
    with pytest.raises(FileNotFoundError, match=r"has no metrics\.jsonl and no eval\.json; pass a training"):
        make_report([tmp_path / "cli"])


def test_a_detection_run_and_its_evaluation_folder_show_their_ap(tmp_path):
    """AP comes from result.json (a training run) and from eval.json (`detect eval`'s folder, no log)."""
    from flyeva.engine.stage import result_record, write_evaluation, write_result

    run, evaluated = tmp_path / "miniature_detect", tmp_path / "detect_eval"
    run.mkdir()
    records = [{"kind": "train", "step": 3, "loss": 2.5}, {"kind": "eval", "step": 3, "bbox_AP": 0.125}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    evaluation = [{"step": 3, "epoch": 1, "bbox_AP": 0.125, "segm_AP": 0.0625}]
    write_result(run, result_record("detect", "train", evaluations=evaluation, primary="bbox_AP", step=3))
    write_evaluation(evaluated, "detect", {"bbox_AP": 0.25, "segm_AP": 0.5}, weights=str(run / "final"))
    report = make_report([run, evaluated], tmp_path / "r")
    assert report.facts["miniature_detect"]["eval bbox_AP"] == 0.125
    assert report.facts["miniature_detect"]["eval segm_AP"] == 0.0625
    assert report.facts["detect_eval"]["eval bbox_AP"] == 0.25
    assert "| eval bbox_AP | 0.125 | 0.25 |" in report.markdown.read_text()
