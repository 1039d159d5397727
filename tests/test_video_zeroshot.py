"""Zero-shot video with EVA-CLIP: frame embeddings averaged per clip, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flyeva.cli import main
from flyeva.tasks.clip.model import ClipModelSection, TextSection, VisionSection, build_clip, save_clip
from flyeva.tasks.video.decode import write_video
from flyeva.tasks.video.zeroshot import video_embeddings


class FrameVectors(torch.nn.Module):
    """encode_image of a frame = its first two pixels, as open_clip's normalize=True returns them."""

    def encode_image(self, frames: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = frames[:, 0, 0, :2]
        return F.normalize(features, dim=-1) if normalize else features


def test_video_embedding_is_the_renormalised_mean_of_normalised_frame_embeddings():
    clips = torch.zeros(1, 2, 1, 1, 1, 2)  # [B, views, T, C, H, W]: two views of one frame each
    clips[0, 0, 0, 0, 0] = torch.tensor([3.0, 0.0])
    clips[0, 1, 0, 0, 0] = torch.tensor([0.0, 1.0])
    embedding = video_embeddings(FrameVectors(), clips)
    # Normalised first: (1, 0) and (0, 1) -> (0.707, 0.707); averaging raw vectors would give (0.949, 0.316).
    assert torch.allclose(embedding, torch.tensor([[2**-0.5, 2**-0.5]]), atol=1e-6)


@pytest.mark.slow
def test_zeroshot_command_writes_its_report(tmp_path, capsys):
    cfg = ClipModelSection(
        embed_dim=16,
        vision=VisionSection(size="miniature"),
        text=TextSection(width=32, heads=2, layers=1, context_length=16, quick_gelu=False),
    )
    torch.manual_seed(0)
    save_clip(build_clip(cfg, release_init=False), cfg, tmp_path / "clip")
    lines = ["path,label"]
    for k in range(4):
        frames = [np.full((32, 40, 3), 40 * k + 5 * t, np.uint8) for t in range(6)]
        write_video(tmp_path / f"v{k}.mp4", frames)
        lines.append(f"v{k}.mp4,{k % 2}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("jumping\nswimming\n")
    out = tmp_path / "zs.json"
    argv = ["video", "zeroshot", "--checkpoint", str(tmp_path / "clip"), "--list", str(tmp_path / "list.csv")]
    argv += [
        "--classes",
        str(tmp_path / "classes.txt"),
        "--num-frames",
        "4",
        "--views",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert (report["videos"], report["classes"], report["views"], report["skipped_videos"]) == (4, 2, 2, 0)
    assert report["top5"] == 100.0 and report["top1"] in (0.0, 25.0, 50.0, 75.0, 100.0)
    assert "video zero-shot: 4 videos" in capsys.readouterr().out
