"""SAM-Lightening modules: Dilated Flash Attention, the Lightening encoder, model builders."""

from samlight.modeling.build import build_student, build_teacher, init_decoder_from, seeded
from samlight.modeling.configs import (
    STUDENT_CONFIGS,
    TEACHER_CONFIGS,
    EncoderConfig,
    StudentConfig,
    TeacherConfig,
    student_config,
    teacher_config,
)
from samlight.modeling.dilated_attention import DilatedBranch, dilated_attention, reference_dilated_attention
from samlight.modeling.image_encoder import LighteningEncoder

__all__ = [
    "STUDENT_CONFIGS",
    "TEACHER_CONFIGS",
    "DilatedBranch",
    "EncoderConfig",
    "LighteningEncoder",
    "StudentConfig",
    "TeacherConfig",
    "build_student",
    "build_teacher",
    "dilated_attention",
    "init_decoder_from",
    "reference_dilated_attention",
    "seeded",
    "student_config",
    "teacher_config",
]
