"""Frozen feature teachers for MIM pretraining (docs/recipes.md §3)."""

# ruff: noqa: F401  (re-exports)
from flyeva.teachers.clip import (
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
