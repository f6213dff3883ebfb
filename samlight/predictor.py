"""Image -> embedding (cached) -> prompts -> masks, for any ``segment_anything`` ``Sam``.

Works for SAM-Lightening students and vanilla SAM teachers alike. Like ``SamPredictor`` it offers
``set_image`` / ``predict``; the stateless pair ``embed`` / ``predict_embedding`` is what servers use
from several threads at once (the embedding cache is shared and thread-safe).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.amg import calculate_stability_score
from segment_anything.utils.transforms import ResizeLongestSide

from samlight.embedding_cache import EmbeddingCache, ImageEmbedding
from samlight.factored_decoder import FactoredMaskDecoder
from samlight.graphed_decoder import CompiledBulkDecoder, GraphedPromptDecoder
from samlight.encoder_wrappers import CompiledEncoder, GraphedEncoder
from samlight.image_io import load_image, to_rgb_array
from samlight.modeling import LighteningEncoder
from samlight.modeling.int8_linear import companion_dtype, int8_encoder

ImageLike = "np.ndarray | Image.Image | str | os.PathLike"
ENCODER_PRECISIONS = ("fp32", "bf16", "int8")


@dataclass
class Prediction:
    masks: np.ndarray  # bool, (C, H, W), or (K, C, H, W) for K prompts
    scores: np.ndarray  # predicted IoU, (C,) or (K, C)
    low_res_logits: np.ndarray  # (C, 256, 256) or (K, C, 256, 256)


def image_key(image: np.ndarray) -> str:
    """Content hash of an RGB array (its shape included)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_encoder_options(fast: bool, int8: bool) -> dict:
    """``Predictor`` keyword arguments for the CPU speed settings (SAMLIGHT_CPU_FAST, SAMLIGHT_CPU_INT8):
    ``int8`` (int8 linears, compiled) wins over ``fast`` (bf16 where oneDNN runs it natively, compiled);
    neither keeps the float32 default."""
    if int8:
        return {"encoder_precision": "int8", "compile_encoder": True}
    if fast:
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return {"encoder_precision": "bf16" if bf16 else "fp32", "compile_encoder": True}
    return {}


def encoder_dtype(precision: str) -> torch.dtype:
    """The float dtype an encoder runs in at ``precision`` (for int8: around its int8 GEMMs)."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": companion_dtype()}[precision]


class Predictor:
    BULK_PROMPTS = 64  # a point grid's batch this large runs on the compiled decoder (see decode_grid)

    def __init__(
        self,
        model: Sam,
        device: str | torch.device | None = None,
        cache: EmbeddingCache | None = None,
        autocast: bool | None = None,
        fast: bool | None = None,
        encoder_precision: str | None = None,
        compile_encoder: bool | None = None,
    ) -> None:
        """``autocast``: bf16 autocast for the decoder (default on CUDA). ``fast``: CUDA graphs for encoder
        and decoder (default on CUDA). ``encoder_precision``: ``fp32``, ``bf16`` or ``int8`` (default bf16
        on CUDA, fp32 on CPU). bf16 also pays on CPUs with AVX512-BF16 or AMX; ``int8`` (CPU only, a
        SAM-Lightening encoder) runs the blocks' linears as int8 GEMMs and the rest in bf16 (float32 where the
        CPU has no native bf16), with a small
        accuracy cost (``samlight eval --precision`` measures it on a checkpoint). ``compile_encoder``: on
        the CPU, ``torch.compile`` the encoder (it fuses bias, GELU, residual adds and int8 quantization
        into the GEMMs; the first embedding pays tens of seconds of compilation). Default: only for int8,
        which is slower than bf16 without it (its activation quantization takes several passes eagerly)."""
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.transform = ResizeLongestSide(model.image_encoder.img_size)
        self.cache = cache if cache is not None else EmbeddingCache()
        on_cuda = self.device.type == "cuda"
        self.autocast = on_cuda if autocast is None else autocast
        fast = on_cuda if fast is None else fast
        # vanilla SAM's encoder copies host tensors while it runs (relative positions): no CUDA graph for it
        graphable = isinstance(model.image_encoder, LighteningEncoder)
        precision = encoder_precision or ("bf16" if fast and graphable else "fp32")
        if precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder_precision must be one of {ENCODER_PRECISIONS}, got {precision!r}")
        encoder = model.image_encoder
        if precision == "int8":
            if on_cuda or not graphable:
                raise ValueError("int8 encoder precision is for SAM-Lightening encoders on the CPU")
            encoder = int8_encoder(encoder)  # a copy: the model keeps its float weights
        if graphable and (fast or precision != "fp32"):
            encoder = GraphedEncoder(encoder, dtype=encoder_dtype(precision))
        if compile_encoder is None:
            compile_encoder = precision == "int8"
        if compile_encoder and not on_cuda:  # on CUDA the encoder's graph already removes the overheads
            encoder = CompiledEncoder(encoder)
        self.encoder = encoder
        self.graphed_decoder = GraphedPromptDecoder(model, autocast=self.autocast) if fast and on_cuda else None
        # on the CPU a click is compute-bound: the factored decoder does 2.5x less work for the same masks
        self.click_decoder = FactoredMaskDecoder(model) if not on_cuda else None
        # large prompt batches (automatic masks): compiled on first use, tens of seconds once per process
        self._bulk_decoder: CompiledBulkDecoder | None = None
        self._bulk_dtype = torch.bfloat16 if on_cuda else torch.float32  # CPUs without AVX512-BF16: fp32
        self._current: ImageEmbedding | None = None

    # --- embeddings -----------------------------------------------------------------------------

    def _precision(self):
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Resize the longest side to the encoder's input, normalise and pad, on the model's device.

        Bicubic with antialiasing, rounded to uint8 levels: what SAM's PIL-based resize computes,
        without a trip through PIL on the CPU.
        """
        height, width = image.shape[:2]
        new_h, new_w = self.transform.get_preprocess_shape(height, width, self.transform.target_length)
        if not image.flags.writeable:  # arrays from PIL are read-only; torch wants to own writable memory
            image = image.copy()
        pixels = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float()
        if (new_h, new_w) != (height, width):
            pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.round_().clamp_(0, 255)
        return self.model.preprocess(pixels), (new_h, new_w)

    @torch.inference_mode()
    def embed_many(self, images: list, keys: list[str | None] | None = None) -> list[ImageEmbedding]:
        """Embed several images in one encoder call (cached ones are not recomputed)."""
        arrays = [self._as_array(image) for image in images]
        keys = [key or image_key(array) for key, array in zip(keys or [None] * len(arrays), arrays)]
        found = {key: self.cache.get(key) for key in dict.fromkeys(keys)}
        todo = [i for i, key in enumerate(keys) if found[key] is None and keys.index(key) == i]
        if todo:
            prepared = [self._prepare(arrays[i]) for i in todo]
            with self._precision():
                features = self.encoder(torch.cat([batch for batch, _ in prepared]))
            for row, i in enumerate(todo):
                embedding = ImageEmbedding(
                    features[row : row + 1].float().clone(), tuple(arrays[i].shape[:2]), prepared[row][1]
                )
                self.cache.put(keys[i], embedding)
                found[keys[i]] = embedding
        return [found[key] for key in keys]

    def embed(self, image, key: str | None = None) -> ImageEmbedding:
        return self.embed_many([image], [key])[0]

    def is_cached(self, key: str) -> bool:
        return key in self.cache

    @staticmethod
    def _as_array(image) -> np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            return load_image(image)
        return to_rgb_array(image)

    # --- prompts -> masks -----------------------------------------------------------------------

    @torch.inference_mode()
    def predict_embedding(
        self,
        embedding: ImageEmbedding,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> Prediction:
        """Masks for one prompt, or K prompts at once (points (K, P, 2) / boxes (K, 4)).

        Coordinates are pixels (x, y) of the original image; labels 1 = foreground, 0 = background.
        """
        points, labels, boxes, batched = validate_prompts(point_coords, point_labels, box, embedding.original_size)
        masks, scores, low_res = self._decode(embedding, points, labels, boxes, mask_input, multimask_output)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        result = Prediction(masks.cpu().numpy(), scores.cpu().numpy(), low_res.cpu().numpy())
        if not batched:
            result = Prediction(result.masks[0], result.scores[0], result.low_res_logits[0])
        return result

    @torch.inference_mode()
    def decode(self, embedding: ImageEmbedding, point_coords: np.ndarray | None = None,
               point_labels: np.ndarray | None = None, box: np.ndarray | None = None,
               mask_input: list[torch.Tensor] | None = None,
               multimask_output: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (K, C, 256, 256) and predicted IoU (K, C) of K prompts, left on the device.
        ``mask_input``: K low-res logits (256, 256) of the previous click."""
        points, labels, boxes, _ = validate_prompts(point_coords, point_labels, box, embedding.original_size)
        masks_in = torch.stack(mask_input) if mask_input else None
        return self._low_res(embedding, points, labels, boxes, masks_in, multimask_output)

    @torch.inference_mode()
    def decode_grid(self, embedding: ImageEmbedding, points: np.ndarray, stability_offset: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What automatic mask generation filters, for K one-point prompts (K, 1, 2): the three masks' low-res
        logits (K, 3, 256, 256), predicted IoU and stability score (K, 3), on the device. From ``BULK_PROMPTS``
        prompts on, a compiled decoder (its first call compiles: about a minute on an H200, 30 s on 2 CPU
        cores; then about 4× faster than the eager decoder on an H200, 2× on a CPU)."""
        labels = np.ones(points.shape[:2], dtype=np.int64)
        if len(points) < self.BULK_PROMPTS:
            low_res, iou = self.decode(embedding, points, labels, multimask_output=True)
            return low_res, iou, calculate_stability_score(low_res, self.model.mask_threshold, stability_offset)
        points, labels, _, _ = validate_prompts(points, labels, None, embedding.original_size)
        coords, labels, _ = self._prompt_tensors(embedding, points, labels, None)
        if self._bulk_decoder is None:
            self._bulk_decoder = CompiledBulkDecoder(self.model, dtype=self._bulk_dtype)
        return self._bulk_decoder(embedding.features, coords, labels, stability_offset)

    @torch.inference_mode()
    def predict_best(
        self,
        embedding: ImageEmbedding,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: list[torch.Tensor] | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, list[float], torch.Tensor]:
        """The best-scoring mask of each of K prompts, in one decoder call, left on the device.

        Prompts as ``predict_embedding``'s batched form (points (K, P, 2) with labels (K, P), and/or boxes
        (K, 4)); ``mask_input`` as ``decode``'s, the logits this returns.
        (Prompts of different point counts take separate calls: padding with SAM's "not a point" token changes
        the answer slightly.) Returns masks (K, H, W) bool, the K scores, and the
        chosen masks' low-res logits (K, 256, 256) for the next click. What a click needs: only the winners
        are upsampled to the image size.
        """
        low_res, iou = self.decode(embedding, point_coords, point_labels, box, mask_input, multimask_output)
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        chosen = low_res[rows, best]  # (K, 256, 256)
        masks = self.model.postprocess_masks(chosen[:, None], embedding.input_size, embedding.original_size)
        return masks[:, 0] > self.model.mask_threshold, iou[rows, best].tolist(), chosen

    def _decode(self, embedding, points, labels, boxes, mask_input, multimask_output):
        """Mask logits at the original size, scores and low-res logits, all still on the device."""
        low_res, iou = self._low_res(embedding, points, labels, boxes, mask_input, multimask_output)
        masks = self.model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)
        return masks, iou, low_res

    def _prompt_tensors(self, embedding, points, labels, boxes):
        """Prompts in the encoder input's coordinates, on the device."""
        size = embedding.original_size
        to_tensor = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt, device=self.device)  # noqa: E731
        coords = to_tensor(self.transform.apply_coords(points, size)) if points is not None else None
        labels = to_tensor(labels, torch.int) if points is not None else None
        boxes = to_tensor(self.transform.apply_boxes(boxes, size)) if boxes is not None else None
        return coords, labels, boxes

    def _low_res(self, embedding, points, labels, boxes, mask_input, multimask_output):
        """Low-res mask logits (K, C, 256, 256) and predicted IoU (K, C), on the device."""
        coords, labels, boxes = self._prompt_tensors(embedding, points, labels, boxes)
        mask_arg = torch.as_tensor(mask_input, dtype=torch.float32, device=self.device) \
            if mask_input is not None else None
        if mask_arg is not None and mask_arg.dim() == 3:
            mask_arg = mask_arg[:, None]
        if self.graphed_decoder is not None:
            return self.graphed_decoder(embedding.features, coords, labels, boxes, multimask_output, mask_arg)
        if self.click_decoder is None:
            return self.sam_low_res(embedding.features, coords, labels, boxes, mask_arg, multimask_output)
        sparse, dense = self.model.prompt_encoder(
            points=(coords, labels) if coords is not None else None, boxes=boxes, masks=mask_arg
        )
        return self.click_decoder(embedding.features, sparse, dense if mask_arg is not None else None,
                                  multimask_output)

    def sam_low_res(self, features, coords, labels, boxes, masks, multimask_output):
        """``_low_res`` by SAM's own prompt encoder and mask decoder, eagerly (prompts as ``_prompt_tensors``
        gives them): the reference the fast decoders are measured against."""
        with self._precision():
            sparse, dense = self.model.prompt_encoder(
                points=(coords, labels) if coords is not None else None, boxes=boxes, masks=masks
            )
            low_res, iou = self.model.mask_decoder(
                image_embeddings=features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
        return low_res.float(), iou.float()

    # --- SamPredictor-style convenience ---------------------------------------------------------

    def set_image(self, image, key: str | None = None) -> ImageEmbedding:
        self._current = self.embed(image, key)
        return self._current

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True,
                return_logits=False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._current is None:
            raise RuntimeError("call set_image() before predict()")
        p = self.predict_embedding(self._current, point_coords, point_labels, box, mask_input, multimask_output,
                                   return_logits)
        return p.masks, p.scores, p.low_res_logits


def _finite_array(name: str, value, last_dim: int) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be numeric, got {value!r}") from None
    if array.ndim == 0 or array.shape[-1] != last_dim:
        raise ValueError(f"{name} must have a last dimension of {last_dim}, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def validate_prompts(point_coords, point_labels, box, size: tuple[int, int]):
    """Checked, batched prompts: points (K, P, 2), labels (K, P), boxes (K, 4), and whether K was given."""
    height, width = size
    if point_coords is None and box is None:
        raise ValueError("give at least one prompt: points or a box")
    points = labels = boxes = None
    batched = False
    if point_coords is not None:
        if point_labels is None:
            raise ValueError("point_labels are required with point_coords")
        points = _finite_array("point_coords", point_coords, 2)
        labels = np.asarray(point_labels)
        if points.ndim not in (2, 3) or labels.shape != points.shape[:-1]:
            raise ValueError(f"point_coords {points.shape} and point_labels {labels.shape} do not match")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("point_labels must be 1 (foreground) or 0 (background)")
        outside = (points[..., 0] < 0) | (points[..., 0] > width) | (points[..., 1] < 0) | (points[..., 1] > height)
        if outside.any():
            raise ValueError(f"point {points[outside][0].tolist()} lies outside the {width}x{height} image")
        batched = points.ndim == 3
        points, labels = points.reshape(-1, points.shape[-2], 2), labels.reshape(-1, labels.shape[-1])
    if box is not None:
        boxes = _finite_array("box", box, 4)
        if boxes.ndim not in (1, 2):
            raise ValueError(f"box must be (4,) or (K, 4), got shape {boxes.shape}")
        batched = batched or boxes.ndim == 2
        boxes = boxes.reshape(-1, 4)
        if ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
            raise ValueError("box must satisfy x0 < x1 and y0 < y1 (empty box)")
        if ((boxes[:, 2] <= 0) | (boxes[:, 3] <= 0) | (boxes[:, 0] >= width) | (boxes[:, 1] >= height)).any():
            raise ValueError(f"box lies outside the {width}x{height} image")
        boxes = np.clip(boxes, 0, [width, height, width, height])
    if points is not None and boxes is not None and len(points) != len(boxes):
        raise ValueError(f"{len(points)} point sets and {len(boxes)} boxes: give one of each per prompt")
    return points, labels, boxes, batched
