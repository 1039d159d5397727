"""`flyeva classify eval`: a classifier folder and a release fine-tuned checkpoint of a non-named size
give the top-1 a hand-written evaluation computes."""

import json

import torch
from test_classify import PATTERNS, write_pattern_folder

from flyeva.cli import main
from flyeva.data.sources import ImageFolderSource
from flyeva.data.transforms import EvalTransform
from flyeva.models.eva import EvaSize
from flyeva.tasks.classify.model import build_classifier, save_classifier

ODD = EvaSize(img_size=32, patch_size=8, embed_dim=40, depth=2, num_heads=5, mlp_dim=80)  # no named size


def hand_top1(model, folder) -> float:
    source = ImageFolderSource(folder / "val", with_labels=True)
    transform = EvalTransform(32)
    images = torch.stack([transform(source.load(i)) for i in range(len(source))])
    with torch.no_grad():
        predicted = model.eval()(images).argmax(-1)
    return 100.0 * float((predicted == torch.tensor(source.targets)).double().mean())


def test_eval_of_a_folder_and_of_a_release_checkpoint_with_num_heads(tmp_path, capsys):
    folder = write_pattern_folder(tmp_path / "data", train=1, val=6, seed=3)
    torch.manual_seed(0)
    model = build_classifier(ODD, len(PATTERNS), head_init_scale=1.0)
    expected = hand_top1(model, folder)
    save_classifier(model, tmp_path / "classifier")
    common = [f"data.root={folder}", "train.num_workers=0", "train.device=cpu"]
    assert (
        main(
            [
                "classify",
                "eval",
                "--weights",
                str(tmp_path / "classifier"),
                *common,
                "--output",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert result["facts"]["num_classes"] == 4 and abs(result["metrics"]["top1"] - expected) < 1e-6
    assert result["verb"] == "eval" and result["weights"] == str(tmp_path / "classifier")

    release = tmp_path / "release.pth"
    state = {
        k.replace("fc_norm.", "norm.") if k.startswith("fc_norm.") else k: v
        for k, v in model.state_dict().items()
    }
    torch.save({"model": state}, release)  # the release's layout: final norm as `norm`, head as `head`
    args = ["classify", "eval", "--weights", str(release), *common, "--output", str(tmp_path / "b")]
    assert main(args) == 2
    assert "pass the number of attention heads (--num-heads" in capsys.readouterr().err
    assert main([*args[:4], "--num-heads", "5", *args[4:]]) == 0
    assert abs(json.loads((tmp_path / "b" / "eval.json").read_text())["metrics"]["top1"] - expected) < 1e-6
