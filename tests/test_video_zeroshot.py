"""Zero-shot video with EVA-CLIP: frame embeddings averaged per clip, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flyeva.cli import main
from flyeva.data.video.decode import write_video
from flyeva.tasks.clip.model import ClipModelSection, TextSection, VisionSection, build_clip, save_clip
from flyeva.tasks.clip.video_zeroshot import video_embeddings


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


def write_clip_and_videos(tmp_path):
    """A tiny random CLIP in tmp_path/clip, four 6-frame videos in list.csv, two classes."""
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


@pytest.mark.slow
def test_clip_zeroshot_routes_a_video_list_to_the_video_evaluation(tmp_path, capsys):
    from flyeva.data.video.datasets import load_video_list
    from flyeva.tasks.clip.model import load_clip
    from flyeva.tasks.clip.video_zeroshot import VIDEO_TEMPLATES, evaluate_video_zeroshot

    write_clip_and_videos(tmp_path)
    out = tmp_path / "results"
    dataset = (
        f"{{name: ucf, type: video_list, path: {tmp_path / 'list.csv'}, "
        f"classnames: {tmp_path / 'classes.txt'}, num_frames: 4}}"
    )
    argv = ["clip", "zeroshot", "--weights", str(tmp_path / "clip"), "--output", str(out)]
    assert main([*argv, f"zeroshot.datasets=[{dataset}]"]) == 0
    routed = json.loads((out / "zeroshot.json").read_text())["datasets"]["ucf"]
    assert sorted(p.name for p in (tmp_path / "clip").iterdir()) == ["config.json", "model.safetensors"]
    model, _ = load_clip(tmp_path / "clip")
    videos = load_video_list("list", str(tmp_path / "list.csv"), "", str(tmp_path / "classes.txt"))
    direct = evaluate_video_zeroshot(model, videos, VIDEO_TEMPLATES, image_size=32, num_frames=4)
    assert (routed["videos"], routed["classes"], routed["num_frames"]) == (4, 2, 4)
    assert routed["top1"] == direct["top1"] and routed["mean_class_top1"] == direct["mean_class_top1"]
    assert "ucf" in capsys.readouterr().out
