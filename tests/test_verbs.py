"""One weights option and one output rule for every eval / predict / zeroshot verb (docs/architecture.md,
"Weights and outputs of verbs"): `--weights W` is read, the results go to runs/<task>_<verb>/<weights
name> (the last printed line names it), nothing is written inside W, and `--output` inside W is refused.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_encoder
from test_classify import PATTERNS, write_pattern_folder
from test_video_zeroshot import write_clip_and_videos

from flyeva.cli import main
from flyeva.config import load_config, recipe_path
from flyeva.engine.stage import weights_name
from flyeva.models.weights import save_weights

# A tiny detector on 32 px ShapeWorld (the detect tests' sizes), evaluated on two images.
DETECT = [
    "data.shapeworld_train=0", "data.shapeworld_val=2", "data.shapeworld_size=32", "model.img_size=32",
    "model.window=4", "model.anchor_sizes=[8,16,32,64]", "test.size=32", "train.device=cpu",
    "model.mask_dims=[16]", "model.box_fc_dims=[32]", "model.out_channels=16", "train.num_workers=0",
]  # fmt: skip
SEGMENT = [
    "data.shapeworld_train=1", "data.shapeworld_val=2", "data.shapeworld_size=32", "aug.crop_size=32",
    "aug.scale=[128,32]", "eval.mode=whole", "train.device=cpu",
]  # fmt: skip
VIDEO = ["model.num_frames=2", "data.val.num_samples=2", "train.num_workers=0", "train.device=cpu"]


def _detector(folder: Path) -> None:
    from flyeva.data.synthetic import SHAPES
    from flyeva.tasks.detect.build import build_detector
    from flyeva.tasks.detect.config import DetectConfig

    cfg = load_config(DetectConfig, recipe_path("detect", "miniature"), DETECT)
    model = build_detector(cfg, len(SHAPES))
    extra = {"classes": list(SHAPES), "category_ids": list(range(1, len(SHAPES) + 1))}
    save_weights(model, folder, kind="detector", arch=model.arch, extra=extra)


def _segmenter(folder: Path) -> None:
    from flyeva.tasks.segment.data import SHAPEWORLD_CLASSES
    from flyeva.tasks.segment.model import ModelSection, UperNetSection, build_segmenter
    from flyeva.tasks.segment.run import save_segmenter

    section = ModelSection(
        size="miniature", patch_size=8, decoder="upernet", upernet=UperNetSection(channels=16, aux_channels=8)
    )
    model = build_segmenter(section, len(SHAPEWORLD_CLASSES), crop_size=32)
    save_segmenter(model, folder, SHAPEWORLD_CLASSES, source={})


def _video(folder: Path) -> None:
    from flyeva.data.synthetic import ACTIONS
    from flyeva.tasks.video.build import build_model
    from flyeva.tasks.video.config import VideoConfig
    from flyeva.tasks.video.model import video_arch

    cfg = load_config(VideoConfig, recipe_path("video", "miniature"), VIDEO)
    model = build_model(cfg.model, list(ACTIONS))
    save_weights(model, folder, kind="video", arch=video_arch(model))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Weights folders named <task>_run/final, and the data the verbs read."""
    from flyeva.tasks.classify.model import build_classifier, save_classifier

    root = tmp_path_factory.mktemp("verbs")
    torch.manual_seed(0)
    patterns = write_pattern_folder(root / "patterns", train=1, val=2, seed=3)
    classifier = build_classifier(tiny_encoder(32), len(PATTERNS), head_init_scale=1.0)
    save_classifier(classifier, root / "classify_run" / "final", extra={"classes": list(PATTERNS)})
    write_clip_and_videos(root)
    (root / "clip_run").mkdir()
    shutil.move(root / "clip", root / "clip_run" / "final")
    _detector(root / "detect_run" / "final")
    _segmenter(root / "segment_run" / "final")
    _video(root / "video_run" / "final")
    images = [str(next((patterns / "val").iterdir()))]  # one class folder: two 32 px images
    video_set = (
        f"{{name: ucf, type: video_list, path: {root / 'list.csv'}, classnames: {root / 'classes.txt'}}}"
    )
    return root, {
        ("classify", "eval"): ([], [f"data.root={patterns}", "train.num_workers=0", "train.device=cpu"]),
        ("classify", "predict"): (images, []),
        ("clip", "zeroshot"): ([], [f"zeroshot.datasets=[{video_set}]", "zeroshot.num_workers=0"]),
        ("detect", "eval"): ([], DETECT),
        ("detect", "predict"): (images, DETECT),
        ("segment", "eval"): ([], SEGMENT),
        ("segment", "predict"): (images, SEGMENT),
        ("video", "eval"): ([], VIDEO),
    }


WRITTEN = {"eval": "eval.json", "predict": "*.png", "zeroshot": "zeroshot.json"}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "task,verb",
    [
        ("classify", "eval"),
        ("classify", "predict"),
        ("clip", "zeroshot"),
        ("detect", "eval"),
        ("detect", "predict"),
        ("segment", "eval"),
        ("segment", "predict"),
        ("video", "eval"),
    ],
)
def test_every_verb_reads_weights_and_writes_under_runs_task_verb(made, task, verb, monkeypatch, capsys):
    root, arguments = made
    inputs, overrides = arguments[(task, verb)]
    weights = root / f"{task}_run" / "final"
    before = snapshot(weights)
    monkeypatch.chdir(root)
    capsys.readouterr()
    assert main([task, verb, *inputs, *overrides, "--weights", str(weights)]) == 0
    out = Path("runs") / f"{task}_{verb}" / f"{task}_run_final"
    assert weights_name(str(weights)) == f"{task}_run_final"
    written = "predictions.json" if (task, verb) == ("classify", "predict") else WRITTEN[verb]
    found = sorted((root / out).glob(written))
    assert found and str(out) in capsys.readouterr().out.strip().splitlines()[-1]
    if written.endswith(".json") and written != "predictions.json":
        record = json.loads(found[0].read_text())
        assert record.get("weights", str(weights)) == str(weights)
    assert snapshot(weights) == before  # the weights folder is as it was: nothing written into it

    inside = weights / "results"
    assert main([task, verb, *inputs, *overrides, "--weights", str(weights), "--output", str(inside)]) == 2
    error = capsys.readouterr().err.strip()
    assert "inside the weights folder" in error and len(error.splitlines()) == 1
    assert not inside.exists() and snapshot(weights) == before


def test_the_weights_name_of_a_run_a_folder_and_a_release_file():
    assert weights_name("runs/miniature_detect/final") == "miniature_detect_final"
    assert weights_name("runs/miniature_detect/final_ema/") == "miniature_detect_final_ema"
    assert weights_name("weights/eva_clip_g") == "eva_clip_g"
    assert weights_name("EVA_CLIP_g_14_psz14_s11B.pt") == "EVA_CLIP_g_14_psz14_s11B"
    assert weights_name("") == "recipe_model"


def test_the_old_spellings_are_the_same_options(tmp_path, capsys):
    """`--checkpoint` is `--weights` and `--out` is `--output`: the inside-the-weights refusal sees both."""
    (tmp_path / "w").mkdir()
    argv = ["classify", "eval", "--checkpoint", str(tmp_path / "w"), "--out", str(tmp_path / "w" / "o")]
    assert main(argv) == 2
    assert "inside the weights folder" in capsys.readouterr().err
