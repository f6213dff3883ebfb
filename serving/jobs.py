"""A segmentation job: JSON in, JSON out, independent of Flask and of where it runs.

A job is one click on one image: one or more objects to segment (several rectangles at once), each a set of
points and/or a box, and what to turn the masks into (``OutputSpec``: brush RLE, polygons, the tight box, after
clean-up). ``execute`` runs it against a ``samlight.predictor.Predictor``, an ``ImageFetcher`` and a
``MaskMemory`` (the previous click's logits, for refinement). The embedded server calls it in process; RQ
workers call it on a GPU (the job and its result cross Redis as JSON, never pickle).

Result (``execute``'s dict)::

    {"width": W, "height": H,              # the EXIF-corrected image size the masks have
     "model_version": "...", "image_key": "url:...",
     "cached": true,                       # the embedding was already cached (no fetch, no encoder)
     "objects": [                          # one per job object, in order (automatic: one per mask found)
        {"score": 0.93,                    # the decoder's predicted IoU of the chosen mask
         "area": 12345,                    # mask pixels (after clean-up)
         "refined": true,                  # the previous click's mask went in as mask_input
         "rle_base64": "...",              # output.brush: Label Studio brush RLE of the uint8 0/255 mask,
                                           # base64 (a noisy mask's RLE is 100k+ bytes, which as a JSON list of
                                           # ints costs ~15 ms to write and read back)
         "polygons": [[[x, y], ...], ...], # output.polygon: pixels, largest part first
         "box": [x0, y0, x1, y1]},         # output.box: pixel edges, or null for an empty mask
        {"skipped": "answered"}],          # skip_answered and this prompt set was answered before
     "timings_ms": {"fetch": .., "embed": .., "mask": .., "outputs": ..}}
                                           # mask: the decoder; outputs: clean-up, polygons, RLE on the host

Failures raise ``JobError`` (``status`` = the HTTP status for the backend's answer); ``run_job`` returns
``{"error": message, "status": code}`` instead, for callers that ship results as JSON.
"""

from __future__ import annotations

import base64
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from serving.automatic import AutoSpec
from serving.errors import StatusError
from serving.images import ImageFetcher
from serving.refinement import MaskMemory

if TYPE_CHECKING:  # the request path must not import torch when jobs run on workers
    from samlight.predictor import Predictor


class JobError(StatusError):
    """A job that cannot run as given."""


@dataclass(frozen=True)
class OutputSpec:
    """What a job's masks are turned into (``serving.outputs`` does it), and how they are cleaned first."""

    brush: bool = True
    polygon: bool = False
    box: bool = False
    min_area: int = 0  # islands smaller than this many pixels are removed, holes smaller are filled; 0: off
    largest_only: bool = False  # keep only the largest connected part
    polygon_tolerance: float = 1.0  # a polygon strays at most this many pixels from the mask

    @property
    def needs_host_mask(self) -> bool:
        """Whether the mask must come to the host (clean-up, contours); a brush alone is encoded on the device."""
        return self.polygon or self.box or self.min_area > 0 or self.largest_only


@dataclass
class ObjectJob:
    """One object of a click: points (pixels of the reference size) and/or a box."""

    points: list[list[float]] | None = None  # [[x, y], ...]
    point_labels: list[int] | None = None  # 1 foreground, 0 background
    box: list[float] | None = None  # [x0, y0, x1, y1]
    key: str | None = None  # this prompt set's name (serving.refinement.click_key): its logits are kept under it
    refine: str | None = None  # the prompt set this one extends: its logits go in as mask_input when kept
    skip_answered: bool = False  # ``key`` already kept: answered before, not segmented again

    def validate(self, where: str) -> None:
        if self.points is None and self.box is None:
            raise JobError(f"{where} needs points or a box")
        if self.points is not None:
            if self.point_labels is None or len(self.point_labels) != len(self.points) or not self.points:
                raise JobError(f"{where}: points and point_labels must be non-empty lists of equal length")
        if self.box is not None and len(self.box) != 4:
            raise JobError(f"{where}: box must be [x0, y0, x1, y1]")


MAX_OBJECTS = 64  # objects of one click (rectangles at once): one decoder call's worth


@dataclass
class SegmentJob:
    image_url: str
    image_key: str
    objects: list[ObjectJob] = field(default_factory=list)
    # the (width, height) the prompt coordinates refer to (Label Studio's original_width/height); when the
    # fetched image differs, coordinates are rescaled to it
    reference_size: list[int] | None = None
    multimask: bool | None = None  # None: several candidates for a lone point, one otherwise
    output: OutputSpec = field(default_factory=OutputSpec)
    auto: AutoSpec | None = None  # automatic masks for the whole image (then no objects)
    prewarm_only: bool = False
    meta: dict[str, Any] = field(default_factory=dict)  # opaque to the executor (task id, label, ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegmentJob":
        if not isinstance(data, dict):
            raise JobError(f"a job must be a JSON object, got {type(data).__name__}")
        try:
            fields = _known_fields(cls, data, "job")
            fields["objects"] = [ObjectJob(**_known_fields(ObjectJob, item, f"job.objects[{i}]"))
                                 for i, item in enumerate(fields.get("objects") or [])]
            if fields.get("output") is not None:
                fields["output"] = OutputSpec(**_known_fields(OutputSpec, fields["output"], "job.output"))
            if fields.get("auto") is not None:
                fields["auto"] = AutoSpec(**_known_fields(AutoSpec, fields["auto"], "job.auto"))
            job = cls(**fields)
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
        if self.auto is not None:
            if self.objects:
                raise JobError("an automatic-masks job has no objects")
            if not 1 <= self.auto.points_per_side <= 128:
                raise JobError(f"job.auto.points_per_side must be 1 to 128, got {self.auto.points_per_side}")
            if not 0 <= self.auto.crop_layers <= 3:
                raise JobError(f"job.auto.crop_layers must be 0 to 3, got {self.auto.crop_layers}")
            return
        if not self.objects:
            raise JobError("a segmentation job needs at least one object (points or a box)")
        if len(self.objects) > MAX_OBJECTS:
            raise JobError(f"a job may segment at most {MAX_OBJECTS} objects, got {len(self.objects)}")
        for index, item in enumerate(self.objects):
            item.validate(f"job.objects[{index}]")

    def scaled_prompts(self, item: ObjectJob, width: int, height: int) -> tuple[
            np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """An object's points, labels and box in pixels of a ``width`` x ``height`` image."""
        sx = sy = 1.0
        if self.reference_size:
            ref_w, ref_h = self.reference_size
            if ref_w > 0 and ref_h > 0 and (ref_w, ref_h) != (width, height):
                sx, sy = width / ref_w, height / ref_h
        scale = np.array([sx, sy])
        points = labels = box = None
        if item.points is not None:
            points = np.asarray(item.points, dtype=np.float64) * scale
            points = np.clip(points, 0, [width, height])
            labels = np.asarray(item.point_labels, dtype=np.int64)
        if item.box is not None:
            box = np.asarray(item.box, dtype=np.float64) * np.tile(scale, 2)
            box = np.clip(box, 0, [width, height, width, height])
        return points, labels, box


def _known_fields(kind, data, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise JobError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = set(data) - set(kind.__dataclass_fields__)
    if unknown:
        raise JobError(f"unknown {where} fields: {sorted(unknown)}")
    return dict(data)


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


def execute(job: SegmentJob, predictor: "Predictor", fetcher: ImageFetcher, model_version: str = "",
            memory: MaskMemory | None = None) -> dict:
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
    if job.auto is not None:
        start = time.perf_counter()
        from serving.automatic import automatic_masks

        found = automatic_masks(predictor, embedding, job.auto, image=lambda: fetcher.fetch(job.image_url))
        timings["mask"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        objects = [{"score": score, "refined": False, **_outputs(mask, job.output)} for mask, score in found]
        timings["outputs"] = (time.perf_counter() - start) * 1000
        result.update(objects=objects, timings_ms=timings)
        return result
    memory = memory if memory is not None else MaskMemory(0)
    answers: list[dict | None] = [None] * len(job.objects)
    # objects whose prompts have the same shape share one decoder call (several rectangles: one call)
    groups: dict[tuple, list[tuple]] = {}  # shape -> (index, points, labels, box, previous logits) of each object
    for index, item in enumerate(job.objects):
        if item.skip_answered and item.key in memory:
            answers[index] = {"skipped": "answered"}
            continue
        points, labels, box = job.scaled_prompts(item, width, height)
        previous = memory.get(item.refine)
        multimask = job.multimask if job.multimask is not None else (box is None and len(points) == 1)
        shape = (0 if points is None else len(points), box is not None, previous is not None, multimask)
        groups.setdefault(shape, []).append((index, points, labels, box, previous))
    decoded = []
    start = time.perf_counter()
    for (_, _, refined, multimask), members in groups.items():
        try:
            masks, scores, low_res = predictor.predict_best(embedding, *_stacked(members), multimask_output=multimask)
        except ValueError as error:
            raise JobError(f"bad prompt: {error}") from None
        # each object's logits are kept apart from the batch's (a view would keep the whole batch alive)
        decoded += [(index, masks[k], scores[k], low_res[k].clone(), refined) for k, (index, *_) in enumerate(members)]
    timings["mask"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    for index, mask, score, logits, refined in decoded:
        memory.put(job.objects[index].key, logits)
        answers[index] = {"score": score, "refined": refined, **_outputs(mask, job.output)}
    timings["outputs"] = (time.perf_counter() - start) * 1000
    result.update(objects=answers, timings_ms=timings)
    return result


def _stacked(members):
    """The members' prompts (all of one shape) as batches: points (K, P, 2), labels, boxes, mask inputs."""
    _, points, labels, boxes, previous = zip(*members)
    return (None if points[0] is None else np.stack(points), None if labels[0] is None else np.stack(labels),
            None if boxes[0] is None else np.stack(boxes), None if previous[0] is None else list(previous))


def _outputs(mask, spec: OutputSpec) -> dict[str, Any]:
    """A chosen mask (a bool tensor on the model's device) in the forms ``spec`` asks for."""
    import torch

    from samlight.brush_rle import mask_to_rle_bytes

    answer: dict[str, Any] = {}
    if spec.needs_host_mask:
        from serving import outputs

        host = outputs.clean(mask.cpu().numpy(), spec.min_area, spec.largest_only)
        if spec.polygon:
            answer["polygons"] = outputs.polygons(host, spec.polygon_tolerance, spec.min_area, spec.largest_only)
        if spec.box:
            answer["box"] = outputs.tight_box(host)
        mask = torch.from_numpy(host).to(mask.device)  # the RLE encoder runs where the model does
    if spec.brush:
        answer["rle_base64"] = base64.b64encode(mask_to_rle_bytes(mask)).decode("ascii")
    answer["area"] = int(mask.sum())
    return answer


def error_result(error: Exception) -> dict:
    status = getattr(error, "status", 500)
    return {"error": str(error), "status": int(status)}


def run_job(data: dict, predictor: "Predictor", fetcher: ImageFetcher, model_version: str = "",
            memory: MaskMemory | None = None) -> dict:
    """``execute`` for JSON callers: a job dict in, a result dict (or ``{"error", "status"}``) out."""
    try:
        return execute(SegmentJob.from_dict(data), predictor, fetcher, model_version, memory)
    except StatusError as error:
        return error_result(error)
