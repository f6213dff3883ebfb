"""Builders: SAM-Lightening students and vanilla SAM teachers, both as ``segment_anything`` ``Sam``s."""

from __future__ import annotations

from functools import partial

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from samlight.modeling.configs import StudentConfig, TeacherConfig
from samlight.modeling.image_encoder import LighteningEncoder

PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]


def _prompt_and_decoder(embed_dim: int, img_size: int, grid: int) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_student(config: StudentConfig, teacher: Sam | None = None) -> Sam:
    """A SAM-Lightening model; prompt encoder and mask decoder copied from ``teacher`` when given."""
    encoder = LighteningEncoder(config.encoder)
    prompt_encoder, mask_decoder = _prompt_and_decoder(
        config.prompt_embed_dim, config.encoder.img_size, config.encoder.grid_size
    )
    sam = Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    if teacher is not None:
        init_decoder_from(sam, teacher)
    return sam.eval()


def init_decoder_from(student: Sam, teacher: Sam) -> None:
    """Copy the teacher's prompt encoder and mask decoder into the student."""
    for name in ("prompt_encoder", "mask_decoder"):
        source = getattr(teacher, name).state_dict()
        target = getattr(student, name)
        try:
            target.load_state_dict(source)
        except RuntimeError as error:
            raise ValueError(f"teacher {name} does not fit the student: {error}") from None


def build_teacher(config: TeacherConfig) -> Sam:
    """A randomly initialised vanilla SAM ViT (load weights with :mod:`samlight.checkpoints`)."""
    grid = config.img_size // 16
    encoder = ImageEncoderViT(
        depth=config.depth,
        embed_dim=config.embed_dim,
        img_size=config.img_size,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=config.num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size,
        out_chans=256,
    )
    prompt_encoder, mask_decoder = _prompt_and_decoder(256, config.img_size, grid)
    sam = Sam(encoder, prompt_encoder, mask_decoder, pixel_mean=PIXEL_MEAN, pixel_std=PIXEL_STD)
    return sam.eval()


def seeded(seed: int, build, *args):
    """Build a model with a fixed random initialisation (tests and demos)."""
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return build(*args)
