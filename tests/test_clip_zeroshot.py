"""Zero-shot evaluation: classifier, top-k, robustness gap, ImageNet subsets, CIFAR pickles, retrieval,
and the dataset sections, which are data sources (docs/data.md)."""

import logging
import os
import pickle

import numpy as np
import pytest
import torch
from clip_dist_worker import tiny_clip
from PIL import Image

from flyeva.config import ConfigError, load_config
from flyeva.data.sources import imagenet_wnids, read_cifar_pickle
from flyeva.tasks.clip.config import ClipConfig
from flyeva.tasks.clip.zeroshot import (
    EvalDatasetSection,
    build_classifier,
    evaluate_classification,
    load_eval_set,
    retrieval_recall,
    summarize,
    tokenizer_for,
    topk_correct,
)


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings():
    model = tiny_clip().eval()
    classnames = ["cat", "dog", "red square"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    tokenize = tokenizer_for(model.context_length)
    columns = []
    with torch.no_grad():
        for name in classnames:
            embeddings = model.text(tokenize([t.format(name) for t in templates]))
            embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
            mean = embeddings.mean(dim=0)
            columns.append(mean / mean.norm())
    expected = torch.stack(columns, dim=1)
    got = build_classifier(model, classnames, templates, classes_per_batch=2)  # batching across classes
    assert got.shape == (24, 3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_topk_counts():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.0, 0.3, 0.9],  # label 1: 2nd highest
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: highest
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # label 5: 6th
        ]
    )
    assert topk_correct(logits, torch.tensor([1, 0, 5])) == {1: 1, 5: 2}
    # 3 classes: row 0's label 1 is now the highest, row 2's label 2 the 3rd; k = 5 is capped at 3.
    assert topk_correct(logits[:, :3], torch.tensor([1, 0, 2]), ks=(1, 5)) == {1: 2, 5: 3}


def test_average_and_robustness_gap():
    top1 = {"imagenet": 80.0, "imagenet_a": 50.0, "imagenet_r": 71.0, "cifar10": 90.0}
    roles = {"imagenet": "in1k", "imagenet_a": "shift", "imagenet_r": "shift", "cifar10": "other"}
    summary = summarize(top1, roles)
    assert summary["average_top1"] == pytest.approx(72.75)
    assert summary["shift_average_top1"] == pytest.approx(60.5)
    assert summary["robustness_gap"] == pytest.approx(-19.5)
    assert "robustness_gap" not in summarize({"cifar10": 90.0}, {"cifar10": "other"})


class PixelModel(torch.nn.Module):
    """encode_image returns row `value` of a fixed feature table, `value` = the image's first pixel."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.table[images[:, 0].long()]


def write_image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def test_imagenet_subset_restricts_the_logits(tmp_path):
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764"
    # ImageNet-A/-R style folders named by wnid: classes 0, 1 and 999 present.
    write_image(tmp_path / "a" / wnids[0] / "x.png", 0)
    write_image(tmp_path / "a" / wnids[1] / "y.png", 1)
    write_image(tmp_path / "a" / wnids[999] / "z.png", 2)
    dataset = load_eval_set(EvalDatasetSection(name="imagenet_a", type="imagenet", path=str(tmp_path / "a")))
    assert dataset.subset == [0, 1, 999]
    assert dataset.labels == [0, 1, 2]
    assert len(dataset.classnames) == 1000 and dataset.classnames[0] == "tench"
    assert dataset.role == "shift"  # from the name
    # Image 0 scores class 5 (not in the subset) highest, then its own class 0: correct in the subset.
    # Image 1 scores class 999 above its own class 1: wrong in the subset too. Image 2 (999): correct.
    table = torch.zeros(3, 1000)
    table[0, [5, 0]] = torch.tensor([1.0, 0.5])
    table[1, [999, 1]] = torch.tensor([0.9, 0.4])
    table[2, [999, 3]] = torch.tensor([0.8, 0.9])
    scores = evaluate_classification(
        PixelModel(table), dataset, torch.eye(1000), lambda image: torch.tensor(np.asarray(image)[0, 0])
    )
    assert scores["top1"] == pytest.approx(200 / 3)
    assert scores["top5"] == pytest.approx(100.0)
    assert scores["classes"] == 3


def test_imagenet_v2_index_folders_class_map_and_subset_file(tmp_path):
    wnids = imagenet_wnids()
    write_image(tmp_path / "v2" / "0" / "a.png", 0)  # ImageNet-V2's release names folders by index
    write_image(tmp_path / "v2" / "999" / "b.png", 0)
    write_image(tmp_path / "v2" / "goldfish" / "c.png", 0)  # mapped by the class map
    (tmp_path / "map.txt").write_text("goldfish\tn01443537\n")
    (tmp_path / "subset.txt").write_text(f"{wnids[999]}\n# a comment\n0\n1\n{wnids[500]}\n")
    section = EvalDatasetSection(
        name="imagenet_v2",
        type="imagenet",
        path=str(tmp_path / "v2"),
        subset=str(tmp_path / "subset.txt"),
        class_map=str(tmp_path / "map.txt"),
    )
    dataset = load_eval_set(section)
    assert dataset.subset == [0, 1, 500, 999]
    assert dataset.labels == [0, 3, 1]  # folders 0, 999, goldfish in sorted order -> subset columns
    assert dataset.source.targets == [0, 999, 1]  # the source's labels are ImageNet class indices
    with pytest.raises(ValueError, match=r"dataset 'bad': .*'goldfish' is neither an ImageNet-1K wnid"):
        load_eval_set(EvalDatasetSection(name="bad", type="imagenet", path=str(tmp_path / "v2")))


def write_cifar10(root, data: np.ndarray, labels: list[int], protocol_module: str = "") -> None:
    root.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=3))
    blob = pickle.dumps({"data": data, "labels": labels, "batch_label": "testing batch 1 of 1"}, protocol=3)
    if protocol_module:  # the module name numpy < 2 (and the Python 2 originals) wrote
        blob = blob.replace(b"cnumpy._core.multiarray\n", f"c{protocol_module}\n".encode())
    (root / "test_batch").write_bytes(blob)


@pytest.mark.parametrize("module", ["", "numpy.core.multiarray"])
def test_cifar_pickles_are_read_into_images_and_labels(tmp_path, module):
    data = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    write_cifar10(tmp_path / "cifar", data, [3, 0, 9], module)
    dataset = load_eval_set(EvalDatasetSection(name="cifar10", type="cifar10", path=str(tmp_path / "cifar")))
    assert dataset.classnames[3] == "cat" and len(dataset.classnames) == 10
    assert dataset.labels == [3, 0, 9]
    image = np.asarray(dataset.source.load(1))
    assert image.shape == (32, 32, 3)
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major over 32 x 32.
    assert image[5, 7, 2] == data[1, 2 * 1024 + 5 * 32 + 7]
    assert image[31, 0, 0] == data[1, 31 * 32]


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_with_one_line(tmp_path):
    marker = tmp_path / "was_run"
    (tmp_path / "evil").write_bytes(pickle.dumps({"data": RunsCode(marker)}, protocol=3))
    with pytest.raises(ValueError, match=r"asks to load (posix|os)\.system"):
        read_cifar_pickle(tmp_path / "evil")
    assert not marker.exists()
    (tmp_path / "eval").write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")
    with pytest.raises(ValueError, match=r"builtins\.eval"):
        read_cifar_pickle(tmp_path / "eval")


def test_retrieval_recall_by_hand():
    similarity = torch.tensor(
        [
            [0.90, 0.10, 0.30, 0.20],  # image 0: its text ranks 1st
            [0.45, 0.40, 0.80, 0.10],  # image 1: 3rd (0.45 and 0.80 above)
            [0.10, 0.70, 0.60, 0.30],  # image 2: 2nd
            [0.30, 0.20, 0.55, 0.50],  # image 3: 2nd
        ]
    )
    recall = retrieval_recall(similarity, torch.arange(4), ks=(1, 2, 3))
    assert recall["image_to_text_R@1"] == 25.0
    assert recall["image_to_text_R@2"] == 75.0
    assert recall["image_to_text_R@3"] == 100.0
    # Columns: text 0 -> image 0 first; text 1 -> 2nd (0.70); text 2 -> 2nd (0.80); text 3 -> first.
    assert recall["text_to_image_R@1"] == 50.0
    assert recall["text_to_image_R@2"] == 100.0


def test_retrieval_with_several_captions_per_image():
    similarity = torch.tensor([[0.2, 0.9, 0.5, 0.1], [0.6, 0.3, 0.4, 0.7]])
    recall = retrieval_recall(similarity, torch.tensor([0, 0, 1, 1]), ks=(1,))
    assert recall["image_to_text_R@1"] == 100.0  # each image's best caption is one of its own
    assert recall["text_to_image_R@1"] == 50.0  # captions 0 and 2 prefer the other image


def test_evaluation_features_are_normalised_by_the_model():
    model = tiny_clip().eval()
    with torch.no_grad():
        features = model.encode_image(torch.randn(3, 3, 32, 32), normalize=True)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))


def test_a_dataset_section_is_a_data_source_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean 'zeroshot\.datasets\.N\.classnames'"):
        load_config(ClipConfig, overrides=["zeroshot.datasets=[{name: x, type: folder, classnams: c.txt}]"])
    cfg = load_config(
        ClipConfig, overrides=["zeroshot.datasets=[{name: c, type: cifar10, path: /c, subset: s}]"]
    )
    with pytest.raises(
        ValueError, match="dataset 'c': data source key 'subset' does not apply to a 'cifar10'"
    ):
        load_eval_set(cfg.zeroshot.datasets[0])
    with pytest.raises(ValueError, match="dataset 'w': a 'captions' source has no labels"):
        load_eval_set(EvalDatasetSection(name="w", type="captions", path="pairs.csv"))
    with pytest.raises(ValueError, match=r"unknown type 'imagenett'; use one of \[.*'video_list'"):
        load_eval_set(EvalDatasetSection(name="t", type="imagenett", path="x"))


def test_folder_and_list_sets_take_class_names_from_folders_or_a_file(tmp_path, caplog):
    write_image(tmp_path / "f" / "red_square" / "a.png", 0)
    write_image(tmp_path / "f" / "red_square" / "b.png", 1)
    write_image(tmp_path / "f" / "blue_disc" / "c.png", 2)
    (tmp_path / "f" / "green_star").mkdir()  # still a candidate class, with a warning
    with caplog.at_level("WARNING"):
        dataset = load_eval_set(EvalDatasetSection(name="shapes", path=str(tmp_path / "f")))
    assert dataset.classnames == ["blue disc", "green star", "red square"]
    assert dataset.labels == [0, 2, 2] and len(dataset.source) == 3 and dataset.role == "other"
    assert "1 class folders hold no images: green_star" in caplog.text
    (tmp_path / "names.txt").write_text("a blue disc\na red square\n")
    with pytest.raises(ValueError, match=r"names 2 classes but .* has 3"):
        load_eval_set(
            EvalDatasetSection(
                name="shapes", path=str(tmp_path / "f"), classnames=str(tmp_path / "names.txt")
            )
        )
    (tmp_path / "list.txt").write_text("f/red_square/a.png 1\nf/blue_disc/c.png 0\n")
    listed = EvalDatasetSection(name="listed", type="list", path=str(tmp_path / "list.txt"))
    with pytest.raises(
        ValueError, match="dataset 'listed': a 'list' source has no class names; set classnames"
    ):
        load_eval_set(listed)
    listed.classnames = str(tmp_path / "names.txt")
    dataset = load_eval_set(listed)
    assert dataset.classnames == ["a blue disc", "a red square"] and dataset.labels == [1, 0]


def test_convert_says_how_it_read_the_file_once(tmp_path, capsys, caplog):
    from test_clip_convert import release_state

    from flyeva.cli import main

    caplog.set_level(logging.INFO)  # what a user sees: the printed lines and the INFO log
    torch.save(release_state(), tmp_path / "eva_clip.pt")
    argv = ["clip", "convert", str(tmp_path / "eva_clip.pt"), "--out", str(tmp_path / "flyeva")]
    assert main([*argv, "--num-heads", "2", "--text-heads", "2"]) == 0
    captured = capsys.readouterr()
    assert (captured.out + captured.err + caplog.text).count("text activation GELU") == 1
