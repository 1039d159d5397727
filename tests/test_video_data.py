"""Video data: TSN indices, decoding exact frames, lists, skipping broken files, exact resume."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from flyeva.data.video.datasets import VideoList, read_folder, read_kinetics_csv, read_path_list
from flyeva.data.video.decode import PyAVDecoder, get_decoder, torchcodec_available, write_video
from flyeva.data.video.stream import ClipBatchStream, VideoSource
from flyeva.data.video.transforms import (
    ClipEvalTransform,
    ClipTrainTransform,
    multi_view_indices,
    three_crop_boxes,
    tsn_test_indices,
    tsn_train_indices,
)

DECODERS = [
    "pyav",
    pytest.param("torchcodec", marks=pytest.mark.skipif(not torchcodec_available(), reason="no torchcodec")),
]


class FixedOffsets:
    """A stand-in generator: the in-segment offsets are given."""

    def __init__(self, offsets):
        self.offsets = np.array(offsets)

    def integers(self, low, high, size):
        assert (self.offsets < high).all() and low == 0 and size == len(self.offsets)
        return self.offsets


def test_tsn_train_indices_one_random_frame_per_segment():
    # 20 frames, 4 segments of 5: offsets 0, 4, 2, 1 -> 0, 9, 12, 16.
    assert tsn_train_indices(20, 4, FixedOffsets([0, 4, 2, 1])) == [0, 9, 12, 16]
    # 10 frames: segments of 10 // 4 = 2 frames, the tail (8, 9) is never drawn (the release's rule).
    rng = np.random.default_rng(0)
    draws = np.array([tsn_train_indices(10, 4, rng) for _ in range(200)])
    for segment in range(4):
        assert set(draws[:, segment]) == {2 * segment, 2 * segment + 1}


def test_tsn_test_indices_are_segment_centres_and_views_spread_evenly():
    assert tsn_test_indices(16, 4) == [2, 6, 10, 14]
    assert tsn_test_indices(10, 4) == [1, 3, 6, 8]  # floor(1.25, 3.75, 6.25, 8.75)
    assert tsn_test_indices(16, 4, view=0, views=4) == [0, 4, 8, 12]
    assert tsn_test_indices(16, 4, view=3, views=4) == [3, 7, 11, 15]
    assert multi_view_indices(8, 2, 2) == [1, 5, 3, 7]


def test_short_video_repeats_frames_in_range():
    # 3 frames for 8 segments: floor((i + 0.5) * 3 / 8), in training too.
    expected = [0, 0, 0, 1, 1, 2, 2, 2]
    assert tsn_test_indices(3, 8) == expected
    assert tsn_train_indices(3, 8, np.random.default_rng(0)) == expected
    assert tsn_test_indices(1, 4) == [0, 0, 0, 0]


def _index_frames(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    return [np.full((height, width, 3), 10 + 20 * k, np.uint8) for k in range(count)]


def _decoded_indices(frames: np.ndarray) -> list[int]:
    return [round((float(frame.mean()) - 10) / 20) for frame in frames]


@pytest.mark.parametrize("decoder_name", DECODERS)
def test_decoder_returns_exactly_the_requested_frames(tmp_path, decoder_name):
    path = write_video(tmp_path / "cfr.mp4", _index_frames(12), fps=25)
    decoder = get_decoder(decoder_name)
    seen = []
    frames = decoder.read(path, lambda n: seen.append(n) or [0, 3, 3, 7, 11, 1], short_side=24)
    assert seen == [12]
    assert frames.shape == (6, 24, 32, 3) and frames.dtype == np.uint8
    assert _decoded_indices(frames) == [0, 3, 3, 7, 11, 1]


@pytest.mark.parametrize("decoder_name", DECODERS)
def test_variable_frame_rate_gives_frames_by_their_own_timestamps(tmp_path, decoder_name):
    # Irregular gaps: frame k is not at k / fps, so only timestamp-based seeking finds it.
    times_ms = [0, 40, 50, 200, 210, 500, 520, 530, 900, 1000, 1300, 1310]
    path = write_video(tmp_path / "vfr.mkv", _index_frames(12), timestamps_ms=times_ms)
    frames = get_decoder(decoder_name).read(path, lambda n: [2, 5, 9, 11, 0])
    assert _decoded_indices(frames) == [2, 5, 9, 11, 0]


def test_decoder_choice_is_validated():
    with pytest.raises(ValueError, match=r"data\.decoder must be one of"):
        get_decoder("decord")
    if not torchcodec_available():
        assert isinstance(get_decoder("auto"), PyAVDecoder)
        with pytest.raises(ValueError, match="apt-get install ffmpeg"):
            get_decoder("torchcodec")


def _clip_list(tmp_path, count: int, broken: tuple[int, ...] = ()) -> VideoList:
    paths = []
    for k in range(count):
        path = tmp_path / f"v{k}.mp4"
        if k in broken:
            path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))  # an mp4 header and nothing else
        else:
            write_video(path, _index_frames(6 + k, 32, 32))
        paths.append(str(path))
    return VideoList(paths, [k % 3 for k in range(count)], ["a", "b", "c"])


def _stream(videos: VideoList, batch_size: int = 2) -> ClipBatchStream:
    source = VideoSource(videos, PyAVDecoder(), num_frames=4, short_side=32, train=True)
    transform = ClipTrainTransform(32, scales=(1.0, 0.875), hflip=0.5)
    return ClipBatchStream(source, transform, batch_size, (4, 3, 32, 32), seed=3)


def test_broken_video_is_skipped_counted_and_named(tmp_path, caplog):
    videos = _clip_list(tmp_path, 4, broken=(2,))
    stream = _stream(videos, batch_size=4)
    stream.set_epoch(0)
    with caplog.at_level(logging.WARNING):
        (batch,) = list(stream)
    assert batch["clips"].shape == (3, 4, 3, 32, 32)
    assert batch["num_skipped"] == 1 and len(batch["labels"]) == 3
    assert "v2.mp4" in caplog.text


def test_resumed_stream_continues_with_the_same_clips(tmp_path):
    stream = _stream(_clip_list(tmp_path, 6))
    stream.set_epoch(1)
    full = list(stream)
    assert len(full) == 3
    stream.set_epoch(1, skip=[1])
    resumed = list(stream)
    assert [b["index"] for b in resumed] == [1, 2]
    for a, b in zip(full[1:], resumed):
        assert torch.equal(a["clips"], b["clips"]) and torch.equal(a["labels"], b["labels"])
    stream.set_epoch(2)
    assert not torch.equal(next(iter(stream))["clips"], full[0]["clips"])  # a new epoch draws new clips


def test_train_transform_applies_one_crop_and_jitter_to_every_frame():
    torch.manual_seed(0)
    frames = np.repeat(np.random.default_rng(0).integers(0, 255, (1, 40, 48, 3), dtype=np.uint8), 4, axis=0)
    clip = ClipTrainTransform(32)(frames)
    assert clip.shape == (4, 3, 32, 32)
    assert all(torch.equal(clip[0], clip[t]) for t in range(1, 4))


def test_eval_transform_three_crops_along_the_long_side():
    assert three_crop_boxes(256, 340, 224, 3) == [(16, 58), (16, 0), (16, 116)]
    assert three_crop_boxes(340, 256, 224, 1) == [(58, 16)]
    views = np.zeros((2 * 4, 40, 48, 3), np.uint8)
    views[4:] = 255  # the second view is white
    out = ClipEvalTransform(32, views=2, crops=3)(views)
    assert out.shape == (6, 4, 3, 32, 32)
    assert (out[:3] < 0).all() and (out[3:] > 0).all()  # views stay in order, crops inside each view


def test_path_list_kinetics_csv_and_folders(tmp_path, caplog):
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.csv").write_text("path,label\na.mp4,2\nsub/c.mp4,0\nmissing.mp4,1\n")
    with caplog.at_level(logging.WARNING):
        listed = read_path_list(tmp_path / "list.csv")
    assert listed.labels == [2, 0] and listed.classes == ["0", "1", "2"] and len(listed.missing) == 1
    assert "missing.mp4" in caplog.text

    root = tmp_path / "k400"
    (root / "air drumming").mkdir(parents=True)
    (root / "abc_000010_000020.mp4").write_bytes(b"x")
    (root / "air drumming" / "xyz_000001_000011.webm").write_bytes(b"x")
    (tmp_path / "k.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nabseiling,abc,10,20,val\n"
        "air drumming,xyz,1,11,val\nabseiling,gone,0,10,val\n"
    )
    kinetics = read_kinetics_csv(tmp_path / "k.csv", str(root))
    assert kinetics.classes == ["abseiling", "air drumming"] and kinetics.labels == [0, 1]
    assert kinetics.paths[1].endswith("air drumming/xyz_000001_000011.webm") and len(kinetics.missing) == 1

    folders = read_folder(root)
    assert folders.classes == ["air drumming"] and len(folders) == 1


def test_a_raw_h264_stream_decodes_its_frames_in_order(tmp_path):
    """An elementary stream (no container, no timestamps, no seeking back) gives the frames of the
    file it was cut from, never a 'PermissionError' skip."""
    import av

    frames = _index_frames(8, 32, 32)
    source = write_video(tmp_path / "clip.mp4", frames)
    raw = tmp_path / "clip.h264"
    with av.open(str(source)) as container, av.open(str(raw), "w", format="h264") as out:
        stream = out.add_stream_from_template(container.streams.video[0])
        for packet in container.demux(container.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    decoder = PyAVDecoder()
    expected = decoder.read(source, lambda n: [n - 1, 0, 3])
    assert np.array_equal(decoder.read(raw, lambda n: [n - 1, 0, 3]), expected)
    assert decoder.read(raw, lambda n: list(range(n))).shape == (8, 32, 32, 3)


def test_class_mappings_and_lists_are_read_without_pickle_and_name_the_file(tmp_path):
    from flyeva.data.video.datasets import read_class_names, read_index_rows

    np.save(tmp_path / "rows.npy", np.array([3, 1, 2]))
    assert read_index_rows(tmp_path / "rows.npy") == [3, 1, 2]
    (tmp_path / "rows.txt").write_text("3\n1\n2\n")
    assert read_index_rows(tmp_path / "rows.txt") == [3, 1, 2]
    np.save(tmp_path / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"model.class_mapping .*pickled.npy is not a plain .npy array"):
        read_index_rows(tmp_path / "pickled.npy")
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"floats.npy holds float64 values, not integer indices"):
        read_index_rows(tmp_path / "floats.npy")
    (tmp_path / "words.txt").write_text("3\nthree\n")
    with pytest.raises(ValueError, match=r"words.txt: entry 2 'three' is not an integer index"):
        read_index_rows(tmp_path / "words.txt")
    (tmp_path / "classes.txt").write_bytes(b"abseiling\nair dr\xe9mming\n")  # Latin-1, not UTF-8
    with pytest.raises(ValueError, match=r"classes.txt line 2 is not valid UTF-8 \(byte 0xe9\)"):
        read_class_names(tmp_path / "classes.txt")


def test_integer_labels_are_classes_0_to_max_each_labelling_a_video_of_the_list(tmp_path):
    """The rule without data.classes: classes 0..max as the list is written (a class whose videos are
    all missing on disk still counts); an unused index is a typo or a partial list: one error."""
    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "list.txt").write_text("a.mp4 0\ngone.mp4 1\na.mp4 2\n")
    listed = read_path_list(tmp_path / "list.txt")
    assert listed.classes == ["0", "1", "2"] and listed.labels == [0, 2]
    (tmp_path / "typo.txt").write_text("a.mp4 0\na.mp4 1\na.mp4 10\n")
    with pytest.raises(ValueError, match=r"typo.txt: integer labels without data.classes make 11 classes"):
        read_path_list(tmp_path / "typo.txt")
    (tmp_path / "classes.txt").write_text("\n".join(f"c{k}" for k in range(11)) + "\n")
    assert read_path_list(tmp_path / "typo.txt", classes_file=str(tmp_path / "classes.txt")).labels == [
        0,
        1,
        10,
    ]
    (tmp_path / "negative.txt").write_text("a.mp4 0\na.mp4 -1\n")
    with pytest.raises(ValueError, match="label -1 is negative"):
        read_path_list(tmp_path / "negative.txt")


@pytest.mark.parametrize("text", ["", "path,label\n"])
def test_a_list_naming_no_videos_is_one_clear_error(tmp_path, text):
    (tmp_path / "empty.csv").write_text(text)
    with pytest.raises(ValueError, match=r"empty.csv.*the list names no videos"):
        read_path_list(tmp_path / "empty.csv")
