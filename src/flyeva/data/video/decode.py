"""Decoding the frames a sampler asks for: PyAV (FFmpeg bundled in its wheels) or torchcodec (docs/video.md).

A decoder's `read(path, choose, short_side)` counts the video's frames, lets `choose(num_frames)`
pick frame indices (repeats allowed), and returns those frames as uint8 [T, H, W, 3] with the short
side at `short_side` (0 = native). Frame i is the i-th frame in presentation order, found by its
own timestamp, so variable-frame-rate videos give the right frames (never i / fps). Any failure
raises `VideoReadError` naming the file; the batch stream skips that video and counts it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DECODERS = ("auto", "pyav", "torchcodec")
Chooser = Callable[[int], Sequence[int]]


class VideoReadError(Exception):
    """A video cannot be decoded (the message names the file and what went wrong)."""


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side at `short_side`, aspect kept (mmaction's Resize(-1, s))."""
    if short_side <= 0 or min(height, width) == short_side:
        return height, width
    if height <= width:
        return short_side, max(1, round(width * short_side / height))
    return max(1, round(height * short_side / width)), short_side


def _check_indices(indices: Sequence[int], num_frames: int, path: str) -> list[int]:
    indices = [int(i) for i in indices]
    if not indices or min(indices) < 0 or max(indices) >= num_frames:
        raise ValueError(f"{path}: frame indices {indices} out of range for {num_frames} frames")
    return indices


class PyAVDecoder:
    """Frames by index with PyAV; see the module docstring."""

    name = "pyav"

    def read(self, path: str | Path, choose: Chooser, short_side: int = 0) -> np.ndarray:
        import av

        path = str(path)
        try:
            with av.open(path) as container:
                if not container.streams.video:
                    raise VideoReadError(f"{path}: no video stream")
                stream = container.streams.video[0]
                timestamps = [packet.pts for packet in container.demux(stream) if packet.size > 0]
                if not timestamps:
                    raise VideoReadError(f"{path}: no video frames")
                if any(pts is None for pts in timestamps):  # no timestamps to seek by: count decoded frames
                    return self._read_sequential(path, choose, short_side)
                timestamps.sort()
                indices = _check_indices(choose(len(timestamps)), len(timestamps), path)
                wanted, frames = {timestamps[i] for i in indices}, {}
                container.seek(min(wanted), stream=stream, backward=True, any_frame=False)
                for frame in container.decode(stream):
                    if frame.pts in wanted and frame.pts not in frames:
                        frames[frame.pts] = _to_rgb(frame, short_side)
                    if frame.pts is not None and frame.pts >= max(wanted) and len(frames) == len(wanted):
                        break
        except (av.error.FFmpegError, OSError, EOFError) as error:
            raise VideoReadError(f"{path}: {type(error).__name__}: {error}") from error
        missing = wanted - frames.keys()
        if missing:
            raise VideoReadError(
                f"{path}: truncated, {len(missing)} of {len(wanted)} wanted frames never decoded"
            )
        return np.stack([frames[timestamps[i]] for i in indices])

    @staticmethod
    def _read_sequential(path: str, choose: Chooser, short_side: int) -> np.ndarray:
        """Frames in decode order: a raw stream (`.h264`, no container) has no timestamps and cannot
        seek back to its start (FFmpeg answers EPERM), so it is opened afresh twice: one pass counts
        the frames, the second keeps the chosen ones (memory for those only)."""
        import av

        with av.open(path) as container:
            count = sum(1 for _ in container.decode(container.streams.video[0]))
        if not count:
            raise VideoReadError(f"{path}: no decodable frames")
        indices = _check_indices(choose(count), count, path)
        wanted, frames = set(indices), {}
        with av.open(path) as container:
            for position, frame in enumerate(container.decode(container.streams.video[0])):
                if position in wanted:
                    frames[position] = _to_rgb(frame, short_side)
                if position >= max(wanted):
                    break
        if len(frames) != len(wanted):
            missing = len(wanted) - len(frames)
            raise VideoReadError(f"{path}: truncated, {missing} wanted frames never decoded")
        return np.stack([frames[i] for i in indices])


def _to_rgb(frame, short_side: int) -> np.ndarray:
    height, width = scaled_size(frame.height, frame.width, short_side)
    return frame.to_ndarray(format="rgb24", width=width, height=height)


class TorchCodecDecoder:
    """Frames by index with torchcodec (exact seek mode); see the module docstring."""

    name = "torchcodec"

    def read(self, path: str | Path, choose: Chooser, short_side: int = 0) -> np.ndarray:
        from torchcodec.decoders import VideoDecoder

        path = str(path)
        try:
            decoder = VideoDecoder(path, seek_mode="exact", dimension_order="NCHW")
            num_frames = decoder.metadata.num_frames or 0
            if num_frames == 0:
                raise VideoReadError(f"{path}: no video frames")
            indices = _check_indices(choose(num_frames), num_frames, path)
            frames = decoder.get_frames_at(indices=indices).data  # uint8 [T, 3, H, W]
        except (RuntimeError, ValueError, OSError) as error:
            raise VideoReadError(f"{path}: {type(error).__name__}: {error}") from error
        height, width = scaled_size(frames.shape[2], frames.shape[3], short_side)
        if (height, width) != tuple(frames.shape[2:]):
            frames = F.interpolate(frames.float(), size=(height, width), mode="bilinear", antialias=True)
            frames = frames.round().clamp(0, 255).to(torch.uint8)
        return frames.permute(0, 2, 3, 1).numpy()


@functools.cache
def torchcodec_available() -> bool:
    """True when torchcodec imports and finds FFmpeg's shared libraries."""
    try:
        import torchcodec.decoders  # noqa: F401
    except Exception:  # ImportError, or RuntimeError/OSError when FFmpeg's libraries are missing
        return False
    return True


def get_decoder(name: str = "auto") -> PyAVDecoder | TorchCodecDecoder:
    """`data.decoder`: auto (torchcodec when it loads, else PyAV) | pyav | torchcodec."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder must be one of {', '.join(DECODERS)}, got {name!r}")
    if name == "torchcodec" or (name == "auto" and torchcodec_available()):
        if not torchcodec_available():
            raise ValueError(
                "data.decoder=torchcodec but torchcodec does not load (not installed, or FFmpeg's shared "
                "libraries are missing: apt-get install ffmpeg); use data.decoder=pyav"
            )
        return TorchCodecDecoder()
    return PyAVDecoder()


def write_video(
    path: str | Path, frames: Sequence[np.ndarray], fps: int = 25, timestamps_ms: Sequence[int] = ()
) -> Path:
    """Encode uint8 [H, W, 3] frames as H.264 (yuv420p); `timestamps_ms` gives variable frame times."""
    from fractions import Fraction

    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast"}
        if timestamps_ms:
            stream.codec_context.time_base = Fraction(1, 1000)
        for index, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")
            if timestamps_ms:
                frame.pts, frame.time_base = int(timestamps_ms[index]), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
