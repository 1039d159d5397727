"""Frozen feature teachers for MIM pretraining (docs/recipes.md §3)."""

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
from flyeva.teachers.frozen import (
    TEACHER_PRECISIONS,
    FrozenTeacher,
    has_native_bf16,
    precision_name,
    resolve_teacher_dtype,
)

__all__ = [
    "CONVERT_COMMAND",
    "DEFAULT_TEACHER",
    "TEACHER_PRECISIONS",
    "ClipTeacher",
    "FrozenTeacher",
    "TeacherArch",
    "TeacherLoadError",
    "build_clip_teacher",
    "check_token_grid",
    "convert_openai_torchscript",
    "has_native_bf16",
    "load_clip_teacher",
    "precision_name",
    "resolve_teacher_dtype",
    "save_clip_teacher",
]
