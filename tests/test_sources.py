"""Source types beyond folders, lists and captions (docs/data.md): ImageNet-labelled folders, CIFAR's
pickles, and a split listed as several sources, concatenated in order."""

import pickle

import numpy as np
import pytest
from PIL import Image

from flyeva.config import load_config, recipe_path
from flyeva.data.sources import ConcatSource, SourceConfig, build_source, imagenet_wnids
from flyeva.tasks.classify.data import build_labeled_source, prepare_data
from flyeva.tasks.classify.finetune import FinetuneConfig


def write_image(path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def test_a_split_of_several_sources_is_their_concatenation_in_order(tmp_path):
    for root, images in (("one", {"cat": 2, "dog": 1}), ("two", {"cat": 1, "dog": 3})):
        for name, count in images.items():
            for index in range(count):
                write_image(tmp_path / root / name / f"{index}.png", 10 * index)
    write_image(tmp_path / "val" / "cat" / "0.png", 0)
    write_image(tmp_path / "val" / "dog" / "0.png", 0)
    folders = ", ".join(f"{{type: folder, path: {tmp_path / name}}}" for name in ("one", "two"))
    overrides = [f"data.train=[{folders}]", f"data.val=[{{type: folder, path: {tmp_path / 'val'}}}]"]
    cfg = load_config(FinetuneConfig, recipe_path("classify", "miniature"), overrides)
    data = prepare_data(cfg.data)
    assert isinstance(data.train, ConcatSource) and len(data.train) == 7 and len(data.val) == 2
    assert (data.num_classes, data.classes) == (2, ["cat", "dog"])
    assert [data.train.target(i) for i in range(7)] == [0, 0, 1, 0, 1, 1, 1]
    assert data.train.key(3) == str(tmp_path / "two" / "cat" / "0.png")  # the second source follows the first
    assert data.train.load(6).getpixel((0, 0)) == (20, 20, 20)
    cfg = load_config(FinetuneConfig, recipe_path("classify", "miniature"), [*overrides[:1], "data.val=[]"])
    assert prepare_data(cfg.data).val is None  # [] trains without evaluation


def test_concatenated_sources_must_label_the_same_classes(tmp_path):
    write_image(tmp_path / "a" / "cat" / "0.png", 0)
    write_image(tmp_path / "b" / "cow" / "0.png", 0)
    (tmp_path / "list.txt").write_text("a/cat/0.png 0\n")
    specs = [SourceConfig(type="folder", path=str(tmp_path / name)) for name in ("a", "b")]
    with pytest.raises(ValueError, match=r"sources 1 and 2 label different classes \(cat vs cow\)"):
        build_labeled_source(specs, "train")
    with pytest.raises(ValueError, match=r"\(cat vs no class names\)"):
        build_labeled_source([specs[0], SourceConfig(type="list", path=str(tmp_path / "list.txt"))], "train")
    (tmp_path / "shard-0.tar").write_bytes(b"")
    shards = SourceConfig(type="wds", path=str(tmp_path / "shard-0.tar"))
    with pytest.raises(ValueError, match=r"cannot be concatenated .* list all its shards in one wds source"):
        build_labeled_source([specs[0], shards], "train")
    merged = build_labeled_source([specs[0], specs[0]], "train")
    assert (
        len(merged) == 2 and merged.targets == [0, 0] and merged.paths[1] == tmp_path / "a" / "cat" / "0.png"
    )


def test_imagenet_folders_are_labelled_with_imagenet_class_indices(tmp_path):
    wnids = imagenet_wnids()
    write_image(tmp_path / "in" / wnids[7] / "a.png", 0)
    write_image(tmp_path / "in" / "3" / "b.png", 0)  # ImageNet-V2's folders are class indices
    source = build_source({"type": "imagenet", "path": str(tmp_path / "in")}, target="label")
    assert source.targets == [3, 7] and source.subset == [3, 7]  # folders "3" < "n0..." in sorted order
    assert len(source.classes) == 1000 and source.classes[7] == wnids[7]  # a 1000-class head's labels
    with pytest.raises(ValueError, match="a 'imagenet' source has no captions"):
        build_source({"type": "imagenet", "path": str(tmp_path / "in")}, target="caption")


def test_cifar_batches_are_a_labelled_source(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    names = [f"class_{index}" for index in range(100)]
    (root / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": []}))
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[1, :1024] = 255  # image 1 is red
    (root / "train").write_bytes(
        pickle.dumps({"data": data, "fine_labels": [41, 99], "coarse_labels": [0, 1]})
    )
    source = build_source({"type": "cifar100", "path": str(root), "split": "train"}, target="label")
    assert (len(source), source.targets, source.classes[41]) == (2, [41, 99], "class_41")
    assert source.load(1).getpixel((31, 31)) == (255, 0, 0) and source.key(1) == "cifar100-train-00001"
    with pytest.raises(ValueError, match="a cifar100 source needs split: train or test, got ''"):
        build_source({"type": "cifar100", "path": str(root)}, target="label")
    with pytest.raises(FileNotFoundError, match=r"CIFAR file .*test does not exist"):
        build_source({"type": "cifar100", "path": str(root), "split": "test"}, target="label")


def test_one_extension_list_finds_images_in_folders_and_webdataset_members(tmp_path):
    import io
    import tarfile

    from flyeva.data.sources import IMAGE_EXTENSIONS, find_images

    write_image(tmp_path / "folder" / "a.BMP", 5)
    (tmp_path / "folder" / "notes.txt").write_text("not an image")
    assert [path.name for path in find_images(tmp_path / "folder")] == ["a.BMP"]
    image = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 9, 9)).save(image, "BMP")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in (("s0.bmp", image.getvalue()), ("s0.cls", b"1"), ("s1.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    source = build_source({"type": "wds", "path": str(tmp_path / "shard.tar")}, target="label")
    (key, data, label), (other, missing, _) = source.iter_shard(str(tmp_path / "shard.tar"))
    assert (key, source.parse_target(key, label), other, missing) == ("s0", 1, "s1", None)
    assert ".bmp" in IMAGE_EXTENSIONS and data == image.getvalue()


def test_predict_inputs_are_a_folders_own_images_and_never_share_an_output_name(tmp_path, capsys):
    """`predict FOLDER`: label PNGs in a subfolder are not inputs; a.jpg and a.png would both write a.png."""
    from PIL import Image

    from flyeva.cli import main
    from flyeva.data.sources import input_images

    (tmp_path / "labels").mkdir()
    for name in ("a.jpg", "b.png", "labels/a.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in input_images([tmp_path])] == ["a.jpg", "b.png"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match=r"a\.jpg and .*a\.png would write the same output a\.png"):
        input_images([tmp_path])
    out = tmp_path / "drawn"
    code = main(["segment", "predict", str(tmp_path), "--weights", str(tmp_path / "none"), "--out", str(out)])
    assert code == 2 and "would write the same output a.png" in capsys.readouterr().err
    assert not out.exists()
