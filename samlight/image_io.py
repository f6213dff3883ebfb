"""Decoding images the way annotators see them: EXIF orientation applied, RGB, with size limits."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageError(ValueError):
    """The bytes are not an image we accept (not an image, too large, too many pixels)."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 50 * 1024 * 1024
    max_pixels: int = 100_000_000
    # SAM resizes the longest side to 1024: beyond 64:1 the short side is under 16 pixels of the model input
    max_aspect: float = 64.0


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), name: str = "image") -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB array at the EXIF-corrected size."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"{name}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            # the header gives the size before any pixel is decoded
            if image.width * image.height > limits.max_pixels:
                raise ImageError(
                    f"{name}: {image.width}x{image.height} pixels exceeds the limit of {limits.max_pixels}"
                )
            if max(image.size) > limits.max_aspect * min(image.size):
                raise ImageError(f"{name}: {image.width}x{image.height} is too elongated to segment (aspect ratio "
                                 f"above {limits.max_aspect:g}:1)")
            return to_rgb_array(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError) as error:
        raise ImageError(f"{name}: not a decodable image ({error})") from None


def load_image(path: str | os.PathLike, limits: ImageLimits = ImageLimits()) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)
    except OSError as error:
        raise ImageError(f"{path}: cannot be read ({error.strerror})") from None
    return decode_image(data, limits, name=str(path))


def to_rgb_array(image: "Image.Image | np.ndarray") -> np.ndarray:
    """PIL image or array (gray, RGB or RGBA) -> contiguous (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 1:
        raise ImageError(f"expected an (H, W, 3) RGB image, got an array of shape {array.shape}")
    if array.dtype != np.uint8:
        raise ImageError(f"expected uint8 pixels, got {array.dtype}")
    return np.ascontiguousarray(array[:, :, :3])
