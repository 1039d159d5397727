"""The demo's pilot-study stage: CLIP-feature MIM vs feature distillation at two pretraining lengths."""

import math

import pytest
import torch
from safetensors.torch import load_file

from flyeva.tasks.demo.ablation import QUICK_STEPS, ablation_section, run_ablation


def _results(short: dict[str, list[float]], long: dict[str, list[float]]) -> dict:
    """Hand-made results: arm -> fine-tune top-1 per seed at 256 and 768 steps (probe = fine-tune / 2)."""

    def row(values: list[float]) -> dict:
        probe = [v / 2 for v in values]
        return {"final": "", "pretrain loss": -0.5, "linear probe": probe, "fine-tune": values}

    return {
        "seeds": [0, 1, 2],
        "steps": [256, 768],
        "quick": False,
        "seconds": 1.0,
        "arms": {arm: {"256": row(short[arm]), "768": row(long[arm])} for arm in short},
    }


MIM, DISTILL = "CLIP-feature MIM", "feature distillation"


def test_the_section_reads_the_papers_claim_from_the_gap_at_each_length():
    # Distillation 10 points ahead after 256 steps, 10 behind after 768: the paper's reading holds.
    holds = _results(
        {MIM: [0.30, 0.31, 0.29], DISTILL: [0.40, 0.41, 0.39]},
        {MIM: [0.60, 0.61, 0.59], DISTILL: [0.50, 0.51, 0.49]},
    )
    section = ablation_section(holds)
    row = "| CLIP-feature MIM | 768 | -0.500 | 30.0 ± 0.5 (3) | 60.0 ± 1.0 (3) | 60.0, 61.0, 59.0 |"
    assert row in section
    assert (
        "distillation minus MIM: +10.0 points at 256 steps, spread 1.0; -10.0 at 768, spread 1.0" in section
    )
    assert "on fine-tune, distillation's gain does not hold as pretraining gets longer: **holds**" in section
    assert (
        "on linear probe, distillation's gain does not hold as pretraining gets longer: **holds**" in section
    )
    assert "fine-tune after 256 steps: **does NOT hold**" in section
    assert "fine-tune after 768 steps: **holds**" in section
    # Distillation ahead at both lengths by more than the spread: the reading does not hold.
    stays = _results(
        {MIM: [0.30, 0.31, 0.29], DISTILL: [0.40, 0.41, 0.39]},
        {MIM: [0.50, 0.51, 0.49], DISTILL: [0.60, 0.61, 0.59]},
    )
    assert (
        "on fine-tune, distillation's gain does not hold as pretraining gets longer: **does NOT hold**"
        in (ablation_section(stays))
    )
    # Never ahead: there is no gain to lose.
    never = _results(
        {MIM: [0.40, 0.41, 0.39], DISTILL: [0.30, 0.31, 0.29]},
        {MIM: [0.60, 0.61, 0.59], DISTILL: [0.50, 0.51, 0.49]},
    )
    assert "distillation has no gain to lose" in ablation_section(never)


@pytest.mark.slow
def test_quick_ablation_trains_both_arms_at_both_lengths(tmp_path):
    results = run_ablation(tmp_path, seeds=(0,), steps=QUICK_STEPS, quick=True)
    assert results["seeds"] == [0] and results["steps"] == [8, 16] and results["quick"] is True
    assert set(results["arms"]) == {MIM, DISTILL}
    for arm in (MIM, DISTILL):
        assert set(results["arms"][arm]) == {"8", "16"}
        for row in results["arms"][arm].values():
            assert -1.0 <= row["pretrain loss"] <= 1.0  # a negative cosine
            assert len(row["linear probe"]) == len(row["fine-tune"]) == 1
            assert all(0.0 <= v <= 1.0 for v in row["linear probe"] + row["fine-tune"])
    # The core's length (QUICK: 8 steps) of the MIM arm is the core's own EVA pretraining folder.
    assert results["arms"][MIM]["8"]["final"] == str(tmp_path / "eva" / "final")
    for steps in ("8", "16"):
        mim = load_file(f"{results['arms'][MIM][steps]['final']}/model.safetensors")
        distill = load_file(f"{results['arms'][DISTILL][steps]['final']}/model.safetensors")
        assert mim.keys() == distill.keys()
        assert all(bool(torch.isfinite(v).all()) for v in (*mim.values(), *distill.values()))
        # Same init and data, other objective: every block's weights moved apart.
        assert not torch.equal(mim["blocks.0.attn.qkv.weight"], distill["blocks.0.attn.qkv.weight"])
    section = ablation_section(results)
    assert section.count("| CLIP-feature MIM |") == 2 and section.count("| feature distillation |") == 2
    assert "one seed: no spread" in section
    assert math.isfinite(results["seconds"])


def test_the_demo_runs_the_ablation_stage_after_its_pool_and_appends_its_section(tmp_path, monkeypatch):
    """`flyeva demo --stages ablation`: the pipeline hands the stage its seeds and lengths, saves the
    results and appends the section (the stage's own training is the test above)."""
    from flyeva.tasks.demo import pipeline

    calls = []
    canned = _results({MIM: [0.3], DISTILL: [0.4]}, {MIM: [0.6], DISTILL: [0.5]})

    def fake_run_ablation(out, seeds, steps, quick):
        calls.append((out, seeds, steps, quick))
        return canned

    monkeypatch.setattr("flyeva.tasks.demo.ablation.run_ablation", fake_run_ablation)
    report = pipeline.run_demo(tmp_path, quick=True, stages=("ablation",))
    assert calls == [(tmp_path, pipeline.QUICK.seeds, QUICK_STEPS, True)]
    assert (tmp_path / "ablation.json").is_file() and report == tmp_path / "report_ablation.md"
    assert report.read_text().count("| CLIP-feature MIM |") == 2
    with pytest.raises(ValueError, match="unknown demo stage"):
        pipeline.run_demo(tmp_path, quick=True, stages=("ablations",))
