"""Linear probe (cached features = live features) and kNN, end to end on a tiny pattern folder."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_classify import PATTERNS, one_thread, write_pattern_folder  # noqa: F401 (one_thread is an autouse fixture)

from flyeva.cli import main
from flyeva.tasks.classify.knn import knn_classify


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    return write_pattern_folder(tmp_path_factory.mktemp("probe_patterns"), train=16, val=8, seed=1)


def probe_args(root, out, *extra):
    return [
        "classify",
        "linprobe",
        f"data.root={root}",
        f"train.output_dir={out}",
        "train.epochs=3",
        "train.batch_size=16",
        "train.num_workers=0",
        "train.progress=false",
        "train.tensorboard=false",
        "optim.lr=0.01",
        "optim.warmup_epochs=0.5",
        *extra,
    ]


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_probe_on_cached_features_equals_probe_on_live_features(small_folder, tmp_path, optimizer):
    runs = {}
    for cache in ("true", "false"):
        out = tmp_path / f"cache_{cache}"
        lr = "optim.lr=0.01" if optimizer == "adamw" else "optim.lr=1.0"
        assert (
            main(probe_args(small_folder, out, f"probe.cache={cache}", f"probe.optimizer={optimizer}", lr))
            == 0
        )
        runs[cache] = (
            load_file(str(out / "final" / "model.safetensors")),
            json.loads((out / "result.json").read_text()),
        )
    cached, live = runs["true"][0], runs["false"][0]
    assert set(cached) == {
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
        "linear.weight",
        "linear.bias",
    }
    start = torch.nn.init.trunc_normal_(torch.empty(4, 96), std=0.01)  # not the trained weights
    assert not torch.allclose(cached["linear.weight"], start, atol=1e-3)
    for name in cached:
        assert torch.allclose(cached[name].double(), live[name].double(), atol=1e-5, rtol=0), name
    cached_summary, live_summary = runs["true"][1], runs["false"][1]
    assert cached_summary["final"]["top1"] == live_summary["final"]["top1"]
    assert cached_summary["final"]["loss"] == pytest.approx(live_summary["final"]["loss"], abs=1e-5)
    if optimizer == "adamw":  # LARS at lr 1.0 moves weights by 0.1% a step: 12 steps learn nothing
        # textures separate linearly
        assert cached_summary["final"]["top1"] >= 90.0, cached_summary["evaluations"]
    features = load_file(str(tmp_path / "cache_true" / "features" / "train.safetensors"))
    assert features["features"].shape == (64, 96) and features["labels"].tolist() == sorted([0, 1, 2, 3] * 16)


def test_probe_reuses_its_cache_and_refuses_augmentation_with_it(small_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(probe_args(small_folder, out, "train.epochs=1")) == 0
    cache = out / "features" / "train.safetensors"
    written = cache.stat().st_mtime_ns
    assert (
        main(probe_args(small_folder, out, "train.epochs=1", "train.resume=never", "train.overwrite=true"))
        == 0
    )
    assert cache.stat().st_mtime_ns == written  # same encoder and data: not extracted again
    assert main(probe_args(small_folder, out, "probe.augment=true")) == 2
    assert "probe.cache=false" in capsys.readouterr().err


def test_knn_command_matches_knn_on_its_cached_features(small_folder, tmp_path):
    out = tmp_path / "knn"
    args = [
        "classify",
        "knn",
        f"data.root={small_folder}",
        f"train.output_dir={out}",
        "train.num_workers=0",
        "knn.k=5",
    ]
    assert main(args) == 0
    record = json.loads((out / "result.json").read_text())
    summary = {**record["metrics"], **record["facts"]}
    train_set = load_file(str(out / "features" / "train.safetensors"))
    val_set = load_file(str(out / "features" / "val.safetensors"))
    expected = knn_classify(
        train_set["features"],
        train_set["labels"],
        val_set["features"],
        val_set["labels"],
        k=5,
        temperature=0.07,
    )
    assert (summary["top1"], summary["top5"]) == (expected["top1"], expected["top5"])
    assert summary["train_samples"] == 64 and summary["val_samples"] == 32
    assert summary["top1"] >= 90.0


class IndexSource:
    """An indexable source whose sample i is the number i (and its label i % 3)."""

    target_type = int

    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count

    def key(self, index):
        return str(index)

    def load(self, index, max_pixels=None):
        return torch.tensor([float(index)])

    def target(self, index):
        return index % 3


@pytest.mark.parametrize("world", [1, 3])
def test_feature_stream_batches_in_the_image_streams_order(world):
    from flyeva.data.stream import ImageBatchStream
    from flyeva.tasks.classify.data import FeatureBatchStream

    features = torch.arange(23.0)[:, None]
    labels = torch.arange(23) % 3
    for rank in range(world):
        images = ImageBatchStream(IndexSource(23), lambda x: x, 4, rank, world, seed=7, drop_last=True)
        cached = FeatureBatchStream(features, labels, 4, rank, world, seed=7, drop_last=True)
        assert cached.num_batches() == images.num_batches() == (23 // world) // 4
        for epoch, skip in ((0, ()), (1, ()), (1, (1,))):
            images.set_epoch(epoch, skip)
            cached.set_epoch(epoch, skip)
            expected = [(b["images"].flatten().tolist(), b["labels"].tolist(), b["index"]) for b in images]
            got = [(b["images"].flatten().tolist(), b["labels"].tolist(), b["index"]) for b in cached]
            assert got == expected and len(got) == cached.num_batches() - (1 if skip else 0)
