"""Frozen feature teachers for MIM pretraining (EVA_SPEC section 3)."""

from flyeva.teachers.clip import (
    CONVERT_COMMAND,
    DEFAULT_TEACHER,
    ClipTeacher,
    TeacherArch,
    TeacherLoadError,
    build_clip_teacher,
    check_token_grid,
    convert_openai_torchscript,
    load_clip_teacher,
    save_clip_teacher,
)

__all__ = [
    "CONVERT_COMMAND",
    "DEFAULT_TEACHER",
    "ClipTeacher",
    "TeacherArch",
    "TeacherLoadError",
    "build_clip_teacher",
    "check_token_grid",
    "convert_openai_torchscript",
    "load_clip_teacher",
    "save_clip_teacher",
]
