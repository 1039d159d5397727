"""Images with targets for the transfer stages (docs/recipes.md §4): class labels and captions."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from flyeva.data.sources import (
    CaptionFolderSource,
    CaptionTableSource,
    FileListSource,
    ImageFolderSource,
    MixtureSource,
    UnreadableTargetError,
    WebDatasetSource,
    build_source,
)
from flyeva.data.stream import ImageBatchStream, build_loader
from flyeva.data.transforms import PretrainTransform

TINY = PretrainTransform(image_size=8)


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (10, 12, 3), dtype=np.uint8))


def write_images(folder: Path, names: list[str], seed: int = 0) -> list[Path]:
    paths = []
    for offset, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(seed + offset).save(path)
        paths.append(path)
    return paths


def write_class_folders(root: Path, counts: dict[str, int]) -> None:
    seed = 0
    for name, count in counts.items():
        write_images(root, [f"{name}/{i}.png" for i in range(count)], seed=seed)
        seed += count


def run(stream: ImageBatchStream, num_workers: int, epoch: int = 0, skip=()) -> list[dict]:
    stream.set_epoch(epoch, skip)
    return list(build_loader(stream, num_workers))


def keys_and_labels(batches: list[dict]) -> list[tuple[str, int]]:
    pairs = []
    for batch in batches:
        assert batch["labels"].dtype == torch.long
        assert len(batch["labels"]) == len(batch["keys"]) == batch["images"].shape[0]
        pairs += zip(batch["keys"], batch["labels"].tolist())
    return pairs


def keys_and_texts(batches: list[dict]) -> list[tuple[str, str]]:
    pairs = []
    for batch in batches:
        assert len(batch["texts"]) == len(batch["keys"]) == batch["images"].shape[0]
        pairs += zip(batch["keys"], batch["texts"])
    return pairs


# ----- class labels -------------------------------------------------------------------------------


def test_image_folder_labels_are_class_folder_indices_across_ranks_and_workers(tmp_path):
    write_class_folders(tmp_path, {"emu": 3, "cat": 5, "dog": 5})
    write_images(tmp_path, ["dog/puppies/deep.png"], seed=50)  # nested: still class "dog"
    source = build_source({"type": "folder", "path": str(tmp_path)}, target="label")
    assert source.classes == ["cat", "dog", "emu"]
    assert source.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    folder_label = {str(p): source.class_to_idx[p.relative_to(tmp_path).parts[0]] for p in source.paths}
    seen = []
    for rank in range(2):
        stream = ImageBatchStream(
            source, TINY, batch_size=2, rank=rank, world_size=2, seed=3, return_ids=True
        )
        assert stream.classes == ["cat", "dog", "emu"]
        batches = run(stream, num_workers=2, epoch=1)
        assert [(b["worker"], b["index"]) for b in batches] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        pairs = keys_and_labels(batches)
        assert all(label == folder_label[key] for key, label in pairs)
        seen += pairs
    keys = [key for key, _ in seen]
    assert len(keys) == len(set(keys)) == 14 and set(keys) == set(folder_label)
    assert torch.bincount(torch.tensor([label for _, label in seen])).tolist() == [5, 6, 3]
    # Without labels the same folder gives images only.
    plain = ImageBatchStream(ImageFolderSource(tmp_path), TINY, batch_size=4)
    assert plain.classes is None and "labels" not in run(plain, 0)[0]


def test_file_list_labels(tmp_path):
    write_images(tmp_path, ["a.png", "sub/b.png", "c d.png"])
    listing = tmp_path / "train.txt"
    listing.write_text("# path label\na.png 3\n\nsub/b.png\t0\nc d.png\t12\n")
    source = FileListSource(listing, with_labels=True)
    assert [source.target(i) for i in range(3)] == [3, 0, 12]
    stream = ImageBatchStream(source, TINY, batch_size=2, seed=1, return_ids=True)
    assert stream.classes is None
    expected = {str(tmp_path / "a.png"): 3, str(tmp_path / "sub/b.png"): 0, str(tmp_path / "c d.png"): 12}
    assert sorted(keys_and_labels(run(stream, 0))) == sorted(expected.items())
    assert "labels" not in run(ImageBatchStream(FileListSource(listing), TINY, batch_size=2), 0)[0]


def test_corrupt_image_in_labelled_folder_keeps_labels_aligned(tmp_path, caplog):
    write_class_folders(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    source = ImageFolderSource(tmp_path, with_labels=True)
    stream = ImageBatchStream(source, TINY, batch_size=4, seed=2, return_ids=True)
    with caplog.at_level(logging.WARNING, logger="flyeva.data.stream"):
        batches = run(stream, 0)
    assert [len(b["keys"]) + b["num_skipped"] for b in batches] == [4, 3]  # raw batch boundaries
    assert sum(b["num_skipped"] for b in batches) == 1
    pairs = keys_and_labels(batches)
    assert sorted(pairs) == sorted(
        (str(tmp_path / f"{c}/{i}.png"), "ab".index(c)) for c in "ab" for i in range(3)
    )
    assert [Path(record.args[0]).name for record in caplog.records] == ["broken.png"]


class CountingFolderSource(ImageFolderSource):
    """Counts label reads, to show that resuming reads no target of a skipped batch."""

    target_reads = 0

    def target(self, index):
        CountingFolderSource.target_reads += 1
        return super().target(index)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_labels_is_bit_identical(tmp_path, num_workers):
    write_class_folders(tmp_path, {"x": 6, "y": 4, "z": 3})

    def stream():
        source = CountingFolderSource(tmp_path, with_labels=True)
        return ImageBatchStream(source, TINY, batch_size=3, seed=7, return_ids=True)

    reference = run(stream(), num_workers, epoch=2)
    assert len(reference) == 5
    resumed = stream()
    resumed.set_epoch(2)
    loader = iter(build_loader(resumed, num_workers))
    skip = [0] * max(num_workers, 1)
    for _ in range(2):
        batch = next(loader)
        skip[batch["worker"]] = batch["index"] + 1
    del loader
    CountingFolderSource.target_reads = 0
    rest = run(stream(), num_workers, epoch=2, skip=skip)
    assert len(rest) == 3
    for got, want in zip(rest, reference[2:]):
        assert got["keys"] == want["keys"]
        assert torch.equal(got["labels"], want["labels"])
        assert torch.equal(got["images"], want["images"])
    if num_workers == 0:
        assert CountingFolderSource.target_reads == 13 - 2 * 3  # the 6 skipped samples were not read


# ----- webdataset targets -------------------------------------------------------------------------


def write_labelled_shards(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Two shards of 4 samples; s1_02's .cls is not a number and s0_03 has no .txt."""
    labels, captions = {}, {}
    for shard in range(2):
        with webdataset.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as writer:
            for i in range(4):
                key = f"s{shard}_{i:02d}"
                sample = {"__key__": key, "jpg": noise_image(10 * shard + i)}
                labels[key] = 4 * shard + i
                sample["cls"] = b"seven" if key == "s1_02" else str(labels[key]).encode()
                captions[key] = f"a photo number {i} of shard {shard}"
                if key != "s0_03":
                    sample["txt"] = f"  {captions[key]}\n".encode()
                writer.write(sample)
    del labels["s1_02"], captions["s0_03"]
    return labels, captions


@pytest.mark.parametrize("target", ["cls", "txt"])
def test_webdataset_labels_and_captions_match_what_was_written(tmp_path, target, caplog):
    labels, captions = write_labelled_shards(tmp_path)
    source = build_source({"type": "wds", "path": str(tmp_path), "target": target})
    stream = ImageBatchStream(source, TINY, batch_size=3, seed=1, return_ids=True)
    with caplog.at_level(logging.WARNING, logger="flyeva.data.stream"):
        batches = run(stream, num_workers=0)
    assert sum(b["num_skipped"] for b in batches) == 1
    assert len(caplog.records) == 1
    if target == "cls":
        assert dict(keys_and_labels(batches)) == labels and len(labels) == 7
        assert caplog.records[0].args[0] == "s1_02" and "'seven', not a non-negative integer" in str(
            caplog.records[0].args[1]
        )
        assert "texts" not in batches[0]
    else:
        assert dict(keys_and_texts(batches)) == captions and len(captions) == 7
        assert caplog.records[0].args[0] == "s0_03" and "has no .txt member" in str(caplog.records[0].args[1])
        assert "labels" not in batches[0]


# ----- captions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table_name", "columns", "separator"),
    [("train.csv", None, ","), ("train.tsv", None, "\t"), ("pairs.tsv", ("image", "caption"), "\t")],
)
def test_caption_tables(tmp_path, table_name, columns, separator):
    images = write_images(tmp_path / "images", ["0.png", "1.png", "2.png", "3.png"])
    path_column, caption_column = columns or ("filepath", "title")
    captions = ["a dog, running", 'the "quoted" cat', "   ", "an absolute path"]
    # The table sits elsewhere, so relative paths need root=; the last row is absolute.
    rows = [["images/0.png", captions[0]], ["images/1.png", captions[1]], ["images/2.png", captions[2]]]
    rows.append([str(images[3]), captions[3]])
    quote = '"' if separator == "," else ""  # the CSV quotes fields with commas, as csv writers do
    lines = [separator.join(["id", path_column, caption_column])]
    for row_id, (path, caption) in enumerate(rows):
        caption = f'"{caption.replace(chr(34), chr(34) * 2)}"' if quote else caption
        lines.append(separator.join([str(row_id), path, caption]))
    table = tmp_path / "meta" / table_name
    table.parent.mkdir()
    table.write_text("\n".join(lines) + "\n")
    spec = {"type": "captions", "path": str(table), "root": str(tmp_path)}
    if columns:
        spec.update(path_column=path_column, caption_column=caption_column)
    source = build_source(spec)
    assert isinstance(source, CaptionTableSource) and len(source) == 4
    assert [source.key(i) for i in range(4)] == [str(path) for path in images]
    assert [source.target(i) for i in (0, 1, 3)] == [captions[0], captions[1], captions[3]]
    with pytest.raises(UnreadableTargetError, match="empty caption"):
        source.target(2)
    stream = ImageBatchStream(source, TINY, batch_size=4, return_ids=True)
    batches = run(stream, 0)
    assert batches[0]["num_skipped"] == 1  # the whitespace-only caption
    expected = {str(images[i]): captions[i] for i in (0, 1, 3)}
    assert dict(keys_and_texts(batches)) == expected


def test_caption_folder_skips_the_image_without_a_sidecar(tmp_path, caplog):
    images = write_images(tmp_path, ["a.png", "sub/b.jpg", "sub/c.png", "d.png"])
    for path, caption in zip(images[:3], ["first\n", "second", "  third  "]):
        path.with_suffix(".txt").write_text(caption)
    stream = ImageBatchStream(
        build_source({"type": "caption_folder", "path": str(tmp_path)}), TINY, batch_size=3, return_ids=True
    )
    for epoch in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flyeva.data.stream"):
            batches = run(stream, 0, epoch=epoch)
        assert sum(b["num_skipped"] for b in batches) == 1
        assert dict(keys_and_texts(batches)) == {
            str(images[0]): "first",
            str(images[1]): "second",
            str(images[2]): "third",
        }
        # Logged once, in the first epoch.
        assert [str(r.args[1]) for r in caplog.records] == (
            ["no caption file d.txt next to the image"] if epoch == 0 else []
        )
    images[0].with_suffix(".txt").write_text(" \n")
    with pytest.raises(UnreadableTargetError, match="empty caption"):
        CaptionFolderSource(tmp_path).target(0)


def test_mixtures_carry_targets_only_of_one_kind(tmp_path):
    write_class_folders(tmp_path / "one", {"a": 2, "b": 2})
    write_class_folders(tmp_path / "two", {"a": 3, "b": 1})
    folders = [ImageFolderSource(tmp_path / name, with_labels=True) for name in ("one", "two")]
    stream = ImageBatchStream(MixtureSource(folders, [1, 1], 12), TINY, batch_size=4, return_ids=True)
    assert stream.classes == ["a", "b"]
    for batch in run(stream, 0):
        for key, label in zip(batch["keys"], batch["labels"].tolist()):
            assert label == "ab".index(Path(key).parent.name)
    write_class_folders(tmp_path / "three", {"a": 1, "c": 1})
    other = ImageFolderSource(tmp_path / "three", with_labels=True)
    with pytest.raises(ValueError, match="different class lists"):
        ImageBatchStream(MixtureSource([folders[0], other], [1, 1], 4), TINY, batch_size=2)
    (tmp_path / "one" / "a" / "0.txt").write_text("a caption")
    captioned = CaptionFolderSource(tmp_path / "one")
    with pytest.raises(ValueError, match="both labels and captions"):
        ImageBatchStream(MixtureSource([folders[0], captioned], [1, 1], 4), TINY, batch_size=2)


# ----- errors -------------------------------------------------------------------------------------


def test_clear_errors_for_bad_targets(tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\nx.png,a cat\n")
    with pytest.raises(
        ValueError,
        match=re.escape("no column(s) ['filepath', 'title']; its columns are ['image', 'caption']"),
    ):
        CaptionTableSource(table)
    with pytest.raises(ValueError, match=re.escape("no column(s) ['title']")):
        CaptionTableSource(table, path_column="image")
    with pytest.raises(
        ValueError, match=re.escape("from its extension '.json'; name it .csv or .tsv, or pass sep=")
    ):
        CaptionTableSource(table.rename(tmp_path / "pairs.json"))

    write_class_folders(tmp_path / "labelled", {"cat": 1, "dog": 1})
    write_images(tmp_path / "labelled", ["stray.png"])
    with pytest.raises(ValueError, match=r"1 images lie directly under .*labelled \(first: .*stray.png\)"):
        ImageFolderSource(tmp_path / "labelled", with_labels=True)
    (tmp_path / "labelled" / "stray.png").unlink()
    (tmp_path / "labelled" / "zebra").mkdir()
    (tmp_path / "labelled" / "ant").mkdir()
    with pytest.raises(ValueError, match=r"2 class folders under .*labelled hold no images: ant, zebra"):
        ImageFolderSource(tmp_path / "labelled", with_labels=True)
    assert len(ImageFolderSource(tmp_path / "labelled")) == 2  # without labels empty folders do not matter

    write_images(tmp_path, ["a.png", "b.png"])
    listing = tmp_path / "list.txt"
    listing.write_text("# header\na.png 1\nb.png cat\n")
    with pytest.raises(ValueError, match=r"list.txt line 3 has label 'cat', not a non-negative integer"):
        FileListSource(listing, with_labels=True)
    listing.write_text("a.png 1\n\nb.png\n")
    with pytest.raises(ValueError, match=r"list.txt line 3 has no label after the path 'b.png'"):
        FileListSource(listing, with_labels=True)
    assert len(FileListSource(listing)) == 2

    with pytest.raises(ValueError, match="target_key must be one of \\['cls', 'txt'\\] or None, got 'json'"):
        WebDatasetSource(str(tmp_path / "x.tar"), target_key="json")
    with pytest.raises(ValueError, match="source key 'root' does not apply to a 'folder' source"):
        build_source({"type": "folder", "path": str(tmp_path), "root": "x"})
    with pytest.raises(ValueError, match="a 'captions' source has no labels"):
        build_source({"type": "captions", "path": str(table)}, target="label")
    with pytest.raises(
        ValueError, match="unknown data source key 'caption_col'; did you mean 'caption_column'"
    ):
        build_source({"type": "captions", "path": str(table), "caption_col": "caption"})
