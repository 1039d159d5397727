"""Shared test sizes: the tiny encoders and the quiet run settings every stage test uses."""

from dataclasses import replace

from flyeva.models.eva import EvaSize

# An encoder small enough for a CPU test (width 32, 2 blocks, 2 heads) at `img_size` with patch 4.
TINY_ENCODER = EvaSize(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_dim=64)
# A run that logs nothing to the terminal or TensorBoard and reads data in the main process.
QUIET_RUN = ["train.device=cpu", "train.num_workers=0", "train.progress=false", "train.tensorboard=false"]


def tiny_encoder(img_size: int = 16, **changes) -> EvaSize:
    """TINY_ENCODER at another image size (and other fields, e.g. depth=3 or patch_size=16)."""
    return replace(TINY_ENCODER, img_size=img_size, **changes)
