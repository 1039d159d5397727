"""The EVA encoder on timm's `Eva`, its named sizes, and checkpoint converters."""

# ruff: noqa: F401  (re-exports)
from flyeva.models.checkpoint import (
    CheckpointError,
    export_release,
    export_timm,
    load_any,
    load_flyeva,
    load_release_checkpoint,
    save_flyeva,
)
from flyeva.models.eva import (
    EVA_SIZES,
    EvaForMIM,
    EvaSize,
    build_encoder,
    build_mim_model,
    count_parameters,
    encoder_flops,
    get_size,
    init_release_weights,
    resize_patch_embed,
    set_image_size,
)
