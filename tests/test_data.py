"""Pretraining data pipeline (docs/recipes.md §3): sources, transforms, sharded/resumable batches."""

from __future__ import annotations

import io
import logging
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image
from torchvision import transforms

from flyeva.data.sources import (
    FileListSource,
    ImageFolderSource,
    MixtureSource,
    SyntheticShapesSource,
    UnreadableImageError,
    WebDatasetSource,
    build_source,
    build_sources,
    decode_rgb,
)
from flyeva.data.stream import ImageBatchStream, build_loader
from flyeva.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    PretrainTransform,
)

# ----- helpers ------------------------------------------------------------------------------------


def noise_image(seed: int, width: int = 40, height: int = 30) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A 1x1 PNG whose IHDR header (with a valid CRC) claims width x height pixels."""
    data = bytearray(encoded(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def run(stream: ImageBatchStream, num_workers: int, epoch: int = 0, skip=()) -> list[dict]:
    stream.set_epoch(epoch, skip)
    return list(build_loader(stream, num_workers))


def all_ids(batches: list[dict]) -> list[int]:
    return [i for batch in batches for i in batch["ids"].tolist()]


def assert_same_batches(actual: list[dict], expected: list[dict], same_workers: bool = True) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert got["keys"] == want["keys"]
        if same_workers:
            assert (got["worker"], got["index"]) == (want["worker"], want["index"])
        assert torch.equal(got["ids"], want["ids"])
        assert torch.equal(got["images"], want["images"])


TINY = PretrainTransform(image_size=8)


def write_shards(folder: Path, num_shards: int, per_shard: int) -> list[str]:
    keys = []
    for shard in range(num_shards):
        with webdataset.TarWriter(str(folder / f"shard-{shard:03d}.tar")) as writer:
            for i in range(per_shard):
                key = f"s{shard}_{i:02d}"
                fmt = "png" if i % 2 else "jpg"
                image = encoded(noise_image(shard * 100 + i, 12, 10), "PNG" if fmt == "png" else "JPEG")
                writer.write({"__key__": key, fmt: image, "cls": b"7", "txt": b"a caption"})
                keys.append(key)
    return keys


# ----- sources ------------------------------------------------------------------------------------


def test_image_folder_is_recursive_sorted_and_case_insensitive(tmp_path):
    (tmp_path / "b").mkdir()
    for name, fmt in [("b/z.PNG", "PNG"), ("a.JpG", "JPEG"), ("b/c.jpeg", "JPEG"), ("m.webp", "WEBP")]:
        noise_image(0).save(tmp_path / name, fmt)
    (tmp_path / "notes.txt").write_text("not an image")
    source = ImageFolderSource(tmp_path)
    assert [Path(source.key(i)).relative_to(tmp_path).as_posix() for i in range(len(source))] == [
        "a.JpG",
        "b/c.jpeg",
        "b/z.PNG",
        "m.webp",
    ]
    assert source.load(0).size == (40, 30) and source.load(3).mode == "RGB"


def test_file_list_resolves_paths_and_ignores_labels_and_comments(tmp_path):
    (tmp_path / "images" / "sub").mkdir(parents=True)
    for name in ["one.png", "sub/two.png"]:
        noise_image(1).save(tmp_path / "images" / name)
    absolute = tmp_path / "abs.png"
    noise_image(2).save(absolute)
    listing = tmp_path / "images" / "train.txt"
    listing.write_text(f"# comment\n\none.png 3\nsub/two.png\t7\n{absolute}\n")
    source = FileListSource(listing)
    assert [source.key(i) for i in range(3)] == [
        str(tmp_path / "images" / "one.png"),
        str(tmp_path / "images" / "sub" / "two.png"),
        str(absolute),
    ]
    moved = tmp_path / "train_elsewhere.txt"
    moved.write_text("one.png\n")
    assert FileListSource(moved, root=tmp_path / "images").key(0) == str(tmp_path / "images" / "one.png")


def test_synthetic_source_depends_only_on_seed_and_index():
    source = SyntheticShapesSource(10, image_size=24, seed=3)
    first = np.asarray(source.load(7))
    assert first.shape == (24, 24, 3)
    source.load(2)
    assert np.array_equal(np.asarray(source.load(7)), first)
    assert np.array_equal(np.asarray(SyntheticShapesSource(10, 24, seed=3).load(7)), first)
    assert not np.array_equal(np.asarray(source.load(6)), first)
    assert not np.array_equal(np.asarray(SyntheticShapesSource(10, 24, seed=4).load(7)), first)


def test_decode_converts_every_mode_to_rgb():
    grey = Image.new("L", (4, 3), 77)
    palette = Image.new("P", (4, 3), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    rgba = Image.new("RGBA", (4, 3), (10, 20, 30, 0))
    cmyk = Image.new("CMYK", (4, 3), (0, 0, 0, 0))
    expected = {"PNG": [grey, palette, rgba], "JPEG": [cmyk]}
    colours = [(77, 77, 77), (10, 200, 30), (10, 20, 30), (255, 255, 255)]
    images = [img for fmt, imgs in expected.items() for img in imgs]
    formats = [fmt for fmt, imgs in expected.items() for _ in imgs]
    for image, fmt, colour in zip(images, formats, colours):
        decoded = decode_rgb(encoded(image, fmt))
        assert decoded.mode == "RGB" and decoded.size == (4, 3)
        assert decoded.getpixel((2, 1)) == colour, image.mode


def test_decode_rejects_oversized_header_before_decoding():
    with pytest.raises(UnreadableImageError, match="5000x5000 = 25000000 pixels, more than max_pixels=10000"):
        decode_rgb(png_claiming_size(5000, 5000), max_pixels=10_000)
    # Above PIL's own hard limit (2 x 89,478,485) with the default max_pixels.
    with pytest.raises(UnreadableImageError, match="too many pixels"):
        decode_rgb(png_claiming_size(20_000, 20_000))


# ----- transforms ---------------------------------------------------------------------------------


def test_pretrain_transform_shape_and_clip_normalisation():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    output = PretrainTransform(image_size=32)(Image.new("RGB", (40, 30), (200, 100, 50)))
    assert output.shape == (3, 32, 32) and output.dtype == torch.float32
    # (v / 255 - mean) / std, by hand: (200/255 - 0.48145466) / 0.26862954 = 1.1274228, etc.
    expected = torch.tensor([1.127422790100434, -0.251320278792892, -0.7692164829323617])
    assert torch.allclose(output, expected[:, None, None].expand(3, 32, 32), atol=1e-6)


def test_pretrain_transform_is_reproducible_from_the_torch_seed():
    transform, image = PretrainTransform(image_size=16), noise_image(5)
    torch.manual_seed(11)
    first = transform(image)
    torch.manual_seed(11)
    assert torch.equal(transform(image), first)
    torch.manual_seed(12)
    assert not torch.equal(transform(image), first)


def test_pretrain_transform_flip_mirrors_the_full_frame_crop():
    image = noise_image(6)  # 40x30: scale 1 and ratio 4/3 make the crop the whole image
    whole = dict(image_size=16, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    plain = PretrainTransform(hflip=0.0, **whole)(image)
    flipped = PretrainTransform(hflip=1.0, **whole)(image)
    assert torch.allclose(flipped, plain.flip(-1), atol=1e-5)
    assert not torch.allclose(flipped, plain, atol=1e-2)


def test_eval_transform_resizes_then_centre_crops():
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    image.paste((0, 0, 0), (0, 0, 8, 30))  # a black band only in the left 8 columns
    output = EvalTransform(image_size=24, crop_pct=0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD)(image)
    # Short side 30 -> 27 (24 / 0.875), width 40 -> 36; the 24-wide centre crop starts at column 6
    # of the resized image, i.e. column 6.67 of the original: inside the band's resized width (7.2).
    assert output.shape == (3, 24, 24)
    red = (200 / 255 - 0.485) / 0.229
    assert output[0, :, -1].allclose(torch.full((24,), red), atol=1e-5)
    assert output[0, 0, 0] < red - 1.0


# ----- batch stream -------------------------------------------------------------------------------


def test_two_ranks_two_workers_cover_the_epoch_exactly_once():
    source = SyntheticShapesSource(23, image_size=12)
    per_rank = []
    for rank in range(2):
        stream = ImageBatchStream(
            source, TINY, batch_size=3, rank=rank, world_size=2, seed=5, return_ids=True
        )
        batches = run(stream, num_workers=2, epoch=3)
        assert len(batches) == stream.num_batches(2) == 4  # 11 samples per rank: 3 + 3 + 3 + 2
        assert [(b["worker"], b["index"]) for b in batches] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        assert [len(b["ids"]) for b in batches] == [3, 3, 3, 2]
        per_rank.append(all_ids(batches))
        if rank == 0:
            # Same seed and epoch without workers: the very same batches, pixel for pixel.
            assert_same_batches(run(stream, num_workers=0, epoch=3), batches, same_workers=False)
            assert all_ids(run(stream, num_workers=0, epoch=4)) != per_rank[0]
    union = per_rank[0] + per_rank[1]
    assert len(union) == len(set(union)) == 22  # 23 - 23 % 2, no duplicates
    assert set(union) < set(range(23))


def test_drop_last_and_small_sources():
    source = SyntheticShapesSource(23, image_size=12)
    stream = ImageBatchStream(source, TINY, batch_size=3, world_size=2, drop_last=True, return_ids=True)
    assert stream.num_batches(0) == 3 and [len(b["ids"]) for b in run(stream, 0)] == [3, 3, 3]
    with pytest.raises(ValueError, match="fewer samples than world_size=4"):
        ImageBatchStream(SyntheticShapesSource(3), TINY, batch_size=1, world_size=4)


class CountingSource(SyntheticShapesSource):
    """Counts decodes, to show that resuming does not decode the skipped batches."""

    loads = 0

    def load(self, index, max_pixels=None):
        CountingSource.loads += 1
        return super().load(index, max_pixels)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_bit_identically(num_workers):
    def stream():
        return ImageBatchStream(
            CountingSource(37, image_size=12), TINY, batch_size=4, seed=9, return_ids=True
        )

    reference = run(stream(), num_workers, epoch=2)
    assert len(reference) == 10
    skip = [0] * max(num_workers, 1)
    consumed = 0
    # Interrupt twice (after 3 batches, then 2 more); the loop keeps per worker the last index + 1.
    for take in [3, 2]:
        resumed = stream()
        resumed.set_epoch(2, skip)
        loader = iter(build_loader(resumed, num_workers))
        for _ in range(take):
            batch = next(loader)
            skip[batch["worker"]] = batch["index"] + 1
        del loader
        consumed += take
        assert sum(skip) == consumed
        CountingSource.loads = 0
        rest = run(stream(), num_workers, epoch=2, skip=skip)
        assert_same_batches(rest, reference[consumed:])
        if num_workers == 0:
            assert CountingSource.loads == 37 - 4 * consumed  # skipped batches were never decoded


def test_corrupt_files_are_skipped_counted_and_reported(tmp_path, caplog):
    good = []
    for i, fmt in enumerate(["PNG", "JPEG", "PNG"]):
        path = tmp_path / f"good{i}.{fmt.lower()}"
        noise_image(i).save(path, fmt)
        good.append(str(path))
    (tmp_path / "empty.png").write_bytes(b"")
    jpeg = encoded(noise_image(9), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_text("this is not a jpeg")
    (tmp_path / "huge.png").write_bytes(png_claiming_size(5000, 5000))
    stream = ImageBatchStream(
        ImageFolderSource(tmp_path), TINY, batch_size=3, max_pixels=10_000, return_ids=True
    )
    for epoch in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flyeva.data.stream"):
            batches = run(stream, num_workers=0, epoch=epoch)
        assert sorted(key for batch in batches for key in batch["keys"]) == sorted(good)
        assert sum(batch["images"].shape[0] for batch in batches) == 3
        assert sum(batch["num_skipped"] for batch in batches) == 4
        assert [len(b["keys"]) + b["num_skipped"] for b in batches] == [3, 3, 1]  # raw batch boundaries
        reasons = {Path(r.args[0]).name: str(r.args[1]) for r in caplog.records}
        if epoch == 0:  # each file is reported once, with its reason
            assert len(caplog.records) == 4
            assert "zero-byte" in reasons["empty.png"]
            assert "truncated" in reasons["truncated.jpg"]
            assert "not a readable image" in reasons["text.jpg"]
            assert "more than max_pixels=10000" in reasons["huge.png"]
        else:
            assert caplog.records == []


@pytest.mark.parametrize(("num_workers", "batch_size"), [(0, 4), (2, 5)])
def test_webdataset_shards_are_read_once_per_epoch_across_ranks(tmp_path, num_workers, batch_size):
    keys = write_shards(tmp_path, num_shards=4, per_shard=5)
    pattern = str(tmp_path / "shard-{000..003}.tar")
    seen = []
    for rank in range(2):
        source = WebDatasetSource(pattern, num_samples=20)
        stream = ImageBatchStream(source, TINY, batch_size, rank=rank, world_size=2, seed=1, return_ids=True)
        batches = run(stream, num_workers, epoch=1)
        assert len(batches) == stream.num_batches(num_workers) == -(-10 // batch_size)
        assert sum(b["num_skipped"] for b in batches) == 0
        assert all(b["images"].shape[1:] == (3, 8, 8) for b in batches)
        seen += [key for batch in batches for key in batch["keys"]]
    assert len(seen) == len(set(seen)) == 20 and set(seen) == set(keys)


def test_webdataset_without_num_samples_reads_each_shard_once_and_counts_imageless_samples(tmp_path):
    keys = write_shards(tmp_path, num_shards=2, per_shard=3)
    with webdataset.TarWriter(str(tmp_path / "shard-002.tar")) as writer:
        writer.write({"__key__": "caption_only", "txt": b"no image here"})
    stream = ImageBatchStream(WebDatasetSource(str(tmp_path)), TINY, batch_size=2, return_ids=True)
    assert stream.num_batches() is None
    batches = run(stream, num_workers=0)
    assert sorted(key for b in batches for key in b["keys"]) == sorted(keys)
    assert sum(b["num_skipped"] for b in batches) == 1


def test_mixture_follows_the_weights_deterministically():
    children = [SyntheticShapesSource(n, image_size=4, seed=n) for n in (10, 20, 7)]
    mixture = MixtureSource(children, [5, 3, 2], samples_per_epoch=3000)
    transform = transforms.PILToTensor()  # cheap: this test is about which samples are drawn
    stream = ImageBatchStream(mixture, transform, batch_size=500, seed=2, return_ids=True)
    batches = run(stream, num_workers=0)
    assert stream.num_batches(0) == len(batches) == 6
    sources = torch.cat([b["sources"] for b in batches])
    frequencies = torch.bincount(sources, minlength=3).double() / len(sources)
    assert torch.allclose(frequencies, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64), atol=0.03)
    ids = torch.cat([b["ids"] for b in batches])
    for child, size in enumerate((10, 20, 7)):  # each child walks its own permutation, all of it
        assert set(ids[sources == child].tolist()) == set(range(size))
    again = run(ImageBatchStream(mixture, transform, batch_size=500, seed=2, return_ids=True), 0)
    assert [b["keys"] for b in again] == [b["keys"] for b in batches]
    assert [b["keys"] for b in run(stream, 0, epoch=1)] != [b["keys"] for b in batches]


def test_mixture_with_webdataset_child_resumes_with_workers(tmp_path):
    write_shards(tmp_path, num_shards=2, per_shard=4)
    mixture = build_sources(
        [
            {"type": "synthetic", "num_samples": 9, "image_size": 12, "weight": 1},
            {"type": "wds", "path": str(tmp_path / "shard-{000..001}.tar"), "weight": 1},
        ],
        samples_per_epoch=27,
    )
    assert mixture.weights == [0.5, 0.5]

    def stream():
        return ImageBatchStream(mixture, TINY, batch_size=4, seed=4, return_ids=True)

    reference = run(stream(), num_workers=2)
    assert len(reference) == 7 and sum(len(b["keys"]) for b in reference) == 27
    assert {key.split(":")[0] for b in reference for key in b["keys"]} == {"0", "1"}
    skip = [2, 1]  # three batches consumed: (worker 0, 0), (1, 0), (0, 1)
    assert_same_batches(run(stream(), 2, skip=skip), reference[3:])


def test_stream_leaves_the_global_rng_alone():
    stream = ImageBatchStream(SyntheticShapesSource(6, image_size=12), TINY, batch_size=4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    run(stream, num_workers=0)
    assert torch.equal(torch.rand(3), expected)


# ----- errors -------------------------------------------------------------------------------------


def test_clear_errors_for_bad_paths(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=re.escape(f"image folder {tmp_path / 'missing'} does not exist")
    ):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"no images found under .*empty"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no webdataset shards found for .*nothing-\{000..003\}"):
        WebDatasetSource(str(tmp_path / "nothing-{000..003}.tar"))
    listing = tmp_path / "list.txt"
    listing.write_text("gone.png 1\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 1 paths .* \(first: .*gone.png\).*pass root="):
        FileListSource(listing)
    with pytest.raises(ValueError, match="unknown data source key 'pth'; did you mean 'path'"):
        build_source({"type": "folder", "pth": str(tmp_path)})
    with pytest.raises(ValueError, match="unknown data source type 'imagefolder'"):
        build_source({"type": "imagefolder"})
    with pytest.raises(ValueError, match="a 'imagenet' data source needs 'path'"):
        build_source({"type": "imagenet"})
    write_shards(tmp_path, num_shards=1, per_shard=2)
    one_shard = WebDatasetSource(str(tmp_path / "shard-000.tar"), num_samples=4)
    with pytest.raises(ValueError, match="1 webdataset shards cannot feed 2 ranks x 1 workers"):
        run(ImageBatchStream(one_shard, TINY, batch_size=2, rank=1, world_size=2), num_workers=0)
    stream = ImageBatchStream(SyntheticShapesSource(8), TINY, batch_size=2)
    with pytest.raises(ValueError, match="same num_workers"):
        run(stream, num_workers=0, skip=[1, 1])
