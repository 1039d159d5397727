"""`flyeva demo --quick`: the miniature pipeline end to end, every table filled, resumable."""

import json

import pytest

from flyeva.cli import main as cli


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    for heading in ("what the paper predicts", "Transfer: top-1", "EVA-CLIP in miniature"):
        assert heading in report
    assert "n/a" not in report
    table_rows = [line for line in report.splitlines() if line.startswith("| ") and "method" not in line]
    assert len(table_rows) == 4 + 2  # four encoders, two CLIP initialisations
    assert report.count("(1) |") >= 6  # every cell has its one seed
    assert report.count("not run") == 1  # the teacher's tower is probed, not fine-tuned
    assert report.index("## Summary") < report.index("![transfer](transfer.png)") < report.index("## Details")
    for plot in ("pretrain_loss.png", "clip_loss.png", "transfer.png", "zeroshot.png"):
        assert (out / plot).stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())
    transfer = results["seeds"]["0"]["transfer"]
    assert set(transfer) == {"EVA (CLIP-feature MIM)", "pixel MIM", "random init", "teacher's vision tower"}
    assert all(0 <= v <= 100 for scores in transfer.values() for v in scores.values())
    assert "fine-tune" not in transfer["teacher's vision tower"]
    # Each MIM arm pretrains once, in the run's folder, and every seed transfers from it.
    assert results["seeds"]["0"]["pretrain"]["eva"]["final"] == str(out / "eva" / "final")
    assert report.count("- CLIP-feature MIM beats") == 4  # random init / pixel MIM x probe / fine-tune
    # A second run finds every stage's result.json and redoes nothing.
    stamps = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    assert cli(["demo", "--quick", "--out", str(out)]) == 0
    assert stamps == {p: p.stat().st_mtime for p in out.rglob("result.json")}
    assert len(stamps) == 1 + 2 + 7 + 2  # teacher; eva, pixel; 4 probes + 3 fine-tunes; 2 CLIPs


def test_verdicts_read_the_spread_and_the_chance_level():
    from flyeva.tasks.demo.report import verdict

    # Hand-computed: means 0.40 vs 0.20, sample spreads 0.02 and 0.02 -> a clear win.
    assert "**holds**" in verdict("c", [0.38, 0.40, 0.42], [0.18, 0.20, 0.22])
    assert "**does NOT hold**" in verdict("c", [0.18, 0.20, 0.22], [0.38, 0.40, 0.42])
    # 0.053 ± 0.005 vs 0.041 ± 0.019: the gap (1.2 points) is inside the larger spread (1.9).
    line = verdict("c", [0.048, 0.053, 0.058], [0.022, 0.041, 0.060])
    assert "inconclusive" in line and "at chance level" in line and "holds" not in line
    assert "one seed" in verdict("c", [0.5], [0.1])


@pytest.mark.slow
def test_demo_stages_run_a_subset_and_report_each_task_from_eva_and_random_init(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--stages", "segment", "--out", str(out)]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks) == {"segment"} and set(tasks["segment"]) == {"EVA init", "random init"}
    for scores in tasks["segment"].values():
        assert 0.0 <= scores["mIoU"] <= 1.0
    report = (out / "report.md").read_text()
    assert "### segment" in report and "| EVA init |" in report and "| random init |" in report
    assert (out / "eva" / "result.json").is_file()  # the tasks start from EVA's pretraining
    assert not (out / "pixel").exists() and not (out / "seed0").exists()  # core's comparisons did not run
    assert cli(["demo", "--stages", "nope", "--out", str(out)]) == 2
    assert "unknown demo stage(s) ['nope']" in capsys.readouterr().err
