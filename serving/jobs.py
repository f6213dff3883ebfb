"""A segmentation job: JSON in, JSON out, independent of Flask and of where it runs.

The backend builds ``SegmentJob``s from Label Studio's requests; ``execute`` runs one against a
``samlight.predictor.Predictor`` and an ``ImageFetcher``. The embedded server calls it in process; RQ
workers call it on a GPU (the job and its result cross Redis as JSON, never pickle).

Result (``execute``'s dict)::

    {"width": W, "height": H,              # the EXIF-corrected image size the mask has
     "rle_base64": "...",                  # Label Studio brush RLE of the uint8 0/255 mask, base64 (absent for
                                           # prewarm; a noisy mask's RLE is 100k+ bytes, which as a JSON list
                                           # of ints costs ~15 ms to write and read back); serving.labelstudio.
                                           # rle_from_base64 gives Label Studio's list
     "score": 0.93,                        # the decoder's predicted IoU of the chosen mask
     "area": 12345,                        # mask pixels
     "model_version": "...", "image_key": "url:...",
     "cached": true,                       # the embedding was already cached (no fetch, no encoder)
     "timings_ms": {"fetch": .., "embed": .., "mask": ..}}   # mask: prompt -> RLE bytes on the host

Failures raise ``JobError`` (``status`` = the HTTP status for the backend's answer); ``run_job`` returns
``{"error": message, "status": code}`` instead, for callers that ship results as JSON.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.images import ImageFetcher
from serving.errors import StatusError

if TYPE_CHECKING:  # the request path must not import torch when jobs run on workers
    from samlight.predictor import Predictor


class JobError(StatusError):
    """A job that cannot run as given."""


@dataclass
class SegmentJob:
    image_url: str
    image_key: str
    points: list[list[float]] | None = None  # [[x, y], ...] pixels of the reference size
    point_labels: list[int] | None = None  # 1 foreground, 0 background
    box: list[float] | None = None  # [x0, y0, x1, y1] pixels of the reference size
    # the (width, height) the prompt coordinates refer to (Label Studio's original_width/height); when the
    # fetched image differs, coordinates are rescaled to it
    reference_size: list[int] | None = None
    multimask: bool | None = None  # None: several candidates for a lone point, one otherwise
    prewarm_only: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # opaque to the executor (task id, label, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentJob":
        if not isinstance(data, dict):
            raise JobError(f"a job must be a JSON object, got {type(data).__name__}")
        known = {name for name in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise JobError(f"unknown job fields: {sorted(unknown)}")
        try:
            job = cls(**data)
        except TypeError as error:
            raise JobError(f"bad job: {error}") from None
        job.validate()
        return job

    def validate(self) -> None:
        if not isinstance(self.image_url, str) or not self.image_url:
            raise JobError("job.image_url must be a non-empty string")
        if not isinstance(self.image_key, str) or not self.image_key:
            raise JobError("job.image_key must be a non-empty string")
        if self.prewarm_only:
            return
        if self.points is None and self.box is None:
            raise JobError("a segmentation job needs points or a box")
        if self.points is not None:
            if self.point_labels is None or len(self.point_labels) != len(self.points) or not self.points:
                raise JobError("job.points and job.point_labels must be non-empty lists of equal length")
        if self.box is not None and len(self.box) != 4:
            raise JobError("job.box must be [x0, y0, x1, y1]")

    def scaled_prompts(self, width: int, height: int) -> tuple[np.ndarray | None, np.ndarray | None,
                                                                  np.ndarray | None]:
        """Points, labels and box in pixels of a ``width`` x ``height`` image."""
        sx = sy = 1.0
        if self.reference_size:
            ref_w, ref_h = self.reference_size
            if ref_w > 0 and ref_h > 0 and (ref_w, ref_h) != (width, height):
                sx, sy = width / ref_w, height / ref_h
        scale = np.array([sx, sy])
        points = labels = box = None
        if self.points is not None:
            points = np.asarray(self.points, dtype=np.float64) * scale
            points = np.clip(points, 0, [width, height])
            labels = np.asarray(self.point_labels, dtype=np.int64)
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float64) * np.tile(scale, 2)
            box = np.clip(box, 0, [width, height, width, height])
        return points, labels, box


def _embedding(job: SegmentJob, predictor: "Predictor", fetcher: ImageFetcher, timings: dict):
    start = time.perf_counter()
    cached = predictor.cache.get(job.image_key)
    if cached is not None:
        return cached, True
    image = fetcher.fetch(job.image_url)
    timings["fetch"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    embedding = predictor.embed(image, key=job.image_key)
    timings["embed"] = (time.perf_counter() - start) * 1000
    return embedding, False


def execute(job: SegmentJob, predictor: "Predictor", fetcher: ImageFetcher, model_version: str = "") -> dict:
    """Run one job; raises ``JobError`` / ``FetchError`` (both carry ``status``)."""
    job.validate()
    timings: dict[str, float] = {}
    embedding, cached = _embedding(job, predictor, fetcher, timings)
    height, width = embedding.original_size
    result: dict[str, Any] = {"width": width, "height": height, "model_version": model_version,
                              "image_key": job.image_key, "cached": cached}
    if job.prewarm_only:
        result["timings_ms"] = timings
        return result
    points, labels, box = job.scaled_prompts(width, height)
    multimask = job.multimask if job.multimask is not None else (box is None and points is not None
                                                                  and len(points) == 1)
    start = time.perf_counter()
    try:
        prediction = predictor.predict_brush(embedding, point_coords=points, point_labels=labels, box=box,
                                             multimask_output=multimask)
    except ValueError as error:
        raise JobError(f"bad prompt: {error}") from None
    timings["mask"] = (time.perf_counter() - start) * 1000
    result.update(rle_base64=base64.b64encode(prediction.rle).decode("ascii"), score=prediction.score,
                  area=prediction.area, timings_ms=timings)
    return result


def error_result(error: Exception) -> dict:
    status = getattr(error, "status", 500)
    return {"error": str(error), "status": int(status)}


def run_job(data: dict, predictor: "Predictor", fetcher: ImageFetcher, model_version: str = "") -> dict:
    """``execute`` for JSON callers: a job dict in, a result dict (or ``{"error", "status"}``) out."""
    try:
        return execute(SegmentJob.from_dict(data), predictor, fetcher, model_version)
    except StatusError as error:
        return error_result(error)
