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


def test_verdicts_need_both_spreads_and_a_floor_above_chance():
    from flyeva.tasks.demo.report import verdict

    # Hand-computed: means 0.40 vs 0.20, sample spreads 0.02 and 0.02 -> a clear win, or a clear loss.
    assert "**holds**" in verdict("c", [0.38, 0.40, 0.42], [0.18, 0.20, 0.22])
    assert "**does NOT hold**" in verdict("c", [0.18, 0.20, 0.22], [0.38, 0.40, 0.42])
    # 0.053 ± 0.005 vs 0.041 ± 0.019: the gap (1.2 points) is inside the larger spread (1.9).
    assert "within the spread" in verdict("c", [0.048, 0.053, 0.058], [0.022, 0.041, 0.060], chance=0.01)
    # 0.070 ± 0.010 vs 0.040 ± 0.010: the gap (3 points) beats both spreads, but the leader's floor
    # (0.060) is not above chance 0.075 (an 8-class task): no verdict.
    line = verdict("c", [0.06, 0.07, 0.08], [0.03, 0.04, 0.05], chance=0.075)
    assert "inconclusive (both are at chance level)" in line and "holds" not in line
    assert "holds" in verdict("c", [0.06, 0.07, 0.08], [0.03, 0.04, 0.05], chance=0.05)  # floor 0.06 > 0.05
    assert "one seed" in verdict("c", [0.5], [0.1]) and "holds" not in verdict("c", [0.5], [0.1])
    # AP and mIoU read as fractions: 0.700 ± 0.010 vs 0.600 ± 0.020, floor 0.150.
    line = verdict("c", [0.69, 0.70, 0.71], [0.58, 0.60, 0.62], chance=0.15, percent=False)
    assert line.endswith("(0.700 ± 0.010 vs 0.600 ± 0.020, 3 seed(s); chance 0.150).")


def test_the_task_section_tables_each_arm_over_seeds_with_its_verdicts():
    from flyeva.tasks.demo.report import task_section

    video = {
        "EVA init": {
            s: {"top1": v, "mean_class_top1": v, "seconds": 1.0} for s, v in enumerate([60, 62, 64])
        },
        "random init": {s: {"top1": v, "mean_class_top1": v} for s, v in enumerate([40, 45, 50])},
    }
    segment = {
        arm: {s: {"mIoU": v} for s, v in enumerate(values)}
        for arm, values in {
            "EVA init": [0.16, 0.15, 0.17],
            "pixel MIM": [0.14, 0.15, 0.16],
            "random init": [0.15, 0.15, 0.15],
        }.items()
    }
    section = task_section({"video": video, "segment": segment})
    assert "| EVA init | 62.0 ± 2.0 (3) | 62.0 ± 2.0 (3) |" in section  # percent, the seconds left out
    assert "| random init | 45.0 ± 5.0 (3) |" in section
    assert "EVA init beats random init on video (top1): **holds** (62.0 ± 2.0 vs 45.0 ± 5.0" in section
    assert "| pixel MIM | 0.1500 ± 0.0100 (3) |" in section
    # 0.160 ± 0.010 vs 0.150: the leader's floor 0.150 is the all-background floor, no verdict.
    assert section.count("on segment (mIoU): inconclusive (both are at chance level)") == 2


@pytest.mark.slow
def test_demo_stages_run_a_subset_and_report_each_task_from_each_arm(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli(["demo", "--quick", "--stages", "segment", "--out", str(out)]) == 0
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks) == {"segment"} and set(tasks["segment"]) == {"EVA init", "pixel MIM", "random init"}
    for by_seed in tasks["segment"].values():
        assert set(by_seed) == {"0"} and 0.0 <= by_seed["0"]["mIoU"] <= 1.0  # the quick budget's one seed
    report = (out / "report_segment.md").read_text()
    assert "### segment" in report and "| EVA init |" in report and "| pixel MIM |" in report
    assert "EVA init beats random init on segment (mIoU): inconclusive (one seed" in report
    assert (out / "eva" / "result.json").is_file() and (out / "pixel" / "result.json").is_file()
    assert not (out / "seed0").exists()  # core's comparisons did not run
    (out / "tasks.json").write_text(json.dumps({"video": {"EVA init": {}}} | tasks))
    assert cli(["demo", "--quick", "--stages", "segment", "--out", str(out)]) == 0  # cached: reports only
    assert set(json.loads((out / "tasks.json").read_text())) == {"video", "segment"}  # earlier tasks kept
    assert cli(["demo", "--stages", "nope", "--out", str(out)]) == 2
    assert "unknown demo stage(s) ['nope']" in capsys.readouterr().err
