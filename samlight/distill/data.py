"""Training data for distillation: image folders, COCO datasets, and programmatic samples.

Everything becomes a list of :class:`TrainingSample`; masks of COCO samples are decoded lazily (one
image's instances at a time) so a dataset of thousands of images costs no memory up front.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from samlight.image_io import load_image, to_rgb_array
from samlight.predictor import image_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# SAM's normalisation (identical for teachers and students)
PIXEL_MEAN = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
PIXEL_STD = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)


@dataclass
class TrainingSample:
    """One image with optional ground truth.

    ``image`` is an RGB uint8 array or a path; ``key`` identifies the image content (computed from the
    pixels when None); ``masks`` are bool (H, W) instance masks at the image's size (may be empty);
    ``boxes`` are optional x0,y0,x1,y1 pixel boxes, one per mask (derived from the masks when None).
    """

    image: np.ndarray | str | Path
    key: str | None = None
    masks: list[np.ndarray] = field(default_factory=list)
    boxes: list | None = None
    # lazily decoded ground truth (COCO); returns (masks, areas)
    mask_loader: Callable[[], tuple[list[np.ndarray], list[float]]] | None = field(default=None, repr=False)

    def load_image(self) -> np.ndarray:
        if isinstance(self.image, (str, os.PathLike)):
            return load_image(self.image)
        return to_rgb_array(self.image)

    def load_masks(self) -> list[np.ndarray]:
        if self.mask_loader is not None:
            return self.mask_loader()[0]
        return [np.asarray(m, dtype=bool) for m in self.masks]

    def load_areas(self) -> list[float]:
        if self.mask_loader is not None:
            return self.mask_loader()[1]
        return [float(np.asarray(m, dtype=bool).sum()) for m in self.masks]

    def load_boxes(self, masks: list[np.ndarray] | None = None) -> list[np.ndarray]:
        """x0, y0, x1, y1 per mask: the given boxes, or the tight box of each mask."""
        if self.boxes is not None:
            return [np.asarray(b, dtype=np.float64) for b in self.boxes]
        return [mask_box(m) for m in (self.load_masks() if masks is None else masks)]

    def content_key(self, image: np.ndarray | None = None) -> str:
        if self.key:
            return self.key
        return image_key(self.load_image() if image is None else image)


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight x0, y0, x1, y1 box of a mask (exclusive right/bottom edge, in pixels)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return np.zeros(4)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


# --- sources -------------------------------------------------------------------------------------


def image_folder(directory: str | os.PathLike) -> list[TrainingSample]:
    """Every image below ``directory`` (recursive, sorted), without ground truth."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory of images")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{directory}: contains no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return [TrainingSample(image=p) for p in files]


def coco_image_dir(annotations: Path) -> Path:
    """annotations/instances_val2017.json -> ../val2017 (the standard COCO layout)."""
    split = annotations.stem.split("_", 1)[-1]
    return annotations.parent.parent / split


def parse_coco_spec(text: str) -> tuple[Path, Path]:
    """``ANNOTATIONS.json[:IMAGE_DIR]`` -> (annotations, image dir)."""
    annotations, sep, images = text.partition(".json:")
    if sep:
        return Path(annotations + ".json"), Path(images)
    annotations = Path(text)
    return annotations, coco_image_dir(annotations)


def coco_dataset(annotations: str | os.PathLike, images: str | os.PathLike | None = None,
                 max_images: int | None = None, include_empty: bool = True) -> list[TrainingSample]:
    """Images of a COCO instances file with their non-crowd instance masks (decoded lazily)."""
    from pycocotools.coco import COCO  # imported here: pycocotools prints on import of data

    annotations = Path(annotations)
    if not annotations.is_file():
        raise ValueError(f"{annotations}: COCO annotations file does not exist")
    images = Path(images) if images is not None else coco_image_dir(annotations)
    if not images.is_dir():
        raise ValueError(f"{images}: COCO image directory does not exist")
    try:
        coco = _quiet_coco(COCO, annotations)
    except (json.JSONDecodeError, KeyError, TypeError, AssertionError) as error:
        raise ValueError(f"{annotations}: not a COCO instances file ({error})") from None
    samples = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        ann_ids = coco.getAnnIds(imgIds=image_id, iscrowd=False)
        if not ann_ids and not include_empty:
            continue
        path = images / info["file_name"]
        if not path.is_file():
            raise ValueError(f"{path}: image listed in {annotations.name} is missing")
        anns = coco.loadAnns(ann_ids)
        samples.append(TrainingSample(image=path, boxes=None, mask_loader=_coco_loader(coco, anns)))
        samples[-1].coco_anns = anns  # type: ignore[attr-defined]  # read by the evaluator
        samples[-1].coco_image_id = image_id  # type: ignore[attr-defined]
        if max_images is not None and len(samples) >= max_images:
            break
    if not samples:
        raise ValueError(f"{annotations}: no images")
    return samples


def _quiet_coco(cls, path: Path):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return cls(str(path))


def _coco_loader(coco, anns: list[dict]):
    def load() -> tuple[list[np.ndarray], list[float]]:
        with warnings.catch_warnings():
            # pycocotools 2.0.x trips a NumPy 2 DeprecationWarning on every mask it decodes
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = [coco.annToMask(a).astype(bool) for a in anns]
        return masks, [float(a["area"]) for a in anns]

    return load


# --- SAM's input transform -----------------------------------------------------------------------


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # (3, S, S) uint8, resized longest side S and zero padded (as SAM does)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def prepare_image(image: np.ndarray, img_size: int) -> PreparedImage:
    """Resize the longest side to ``img_size`` and pad bottom/right, exactly as ``Sam.preprocess``."""
    resized = ResizeLongestSide(img_size).apply_image(image)
    h, w = resized.shape[:2]
    pixels = torch.zeros(3, img_size, img_size, dtype=torch.uint8)
    pixels[:, :h, :w] = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1)
    return PreparedImage(pixels, tuple(image.shape[:2]), (h, w))


def normalize(pixels: torch.Tensor, input_sizes: list[tuple[int, int]]) -> torch.Tensor:
    """(B, 3, S, S) uint8 padded -> normalised float with zero padding, exactly as ``Sam.preprocess``."""
    x = (pixels.float() - PIXEL_MEAN.to(pixels.device)) / PIXEL_STD.to(pixels.device)
    valid = torch.zeros(x.shape[0], 1, x.shape[2], x.shape[3], device=x.device)
    for i, (h, w) in enumerate(input_sizes):
        valid[i, :, :h, :w] = 1
    return x * valid


def masks_to_low_res(masks: list[np.ndarray], input_size: tuple[int, int], low_res: int, img_size: int) -> torch.Tensor:
    """GT masks (H, W) -> (K, low_res, low_res) float in {0,1} in the padded model frame."""
    if not masks:
        return torch.zeros(0, low_res, low_res)
    scale = low_res / img_size
    h, w = max(1, round(input_size[0] * scale)), max(1, round(input_size[1] * scale))
    stack = torch.from_numpy(np.stack(masks).astype(np.float32))[:, None]
    small = F.interpolate(stack, size=(h, w), mode="area")[:, 0]
    out = torch.zeros(len(masks), low_res, low_res)
    out[:, :h, :w] = (small >= 0.5).float()
    return out
