"""Label Studio brush RLE on the backend's side: carrying it, writing it into JSON, reading it back.

The encoder is ``samlight.brush_rle`` (it runs where the mask is, on the worker's GPU); a job result carries
its bytes as base64 text. Decoding uses the sdk's own decoder. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import dataclass

import numpy as np
from label_studio_sdk.converter.brush import decode_rle

log = logging.getLogger(__name__)

class BrushRle(bytes):
    """Brush RLE bytes that ``dumps`` writes as Label Studio's JSON list of numbers."""

    # "  7," for every byte value: a JSON list by one table lookup (whitespace is valid JSON)
    _CELLS = np.frombuffer(b"".join(f"{v:3d},".encode() for v in range(256)), dtype=np.uint32)

    def json(self) -> bytes:
        if not self:
            return b"[]"
        cells = self._CELLS.take(np.frombuffer(self, dtype=np.uint8)).tobytes()
        return b"[" + cells[:-1] + b"]"


def rle_from_base64(text: str) -> BrushRle:
    """The RLE Label Studio expects, from a job result's ``rle_base64``."""
    return BrushRle(base64.b64decode(text, validate=True))


def dumps(obj) -> bytes:
    """``json.dumps`` that writes ``BrushRle`` values by table lookup: a noisy mask's RLE is 100k+ numbers, about
    10 ms through the json module and well under 1 ms this way."""
    nonce = uuid.uuid4().hex
    rendered: dict[bytes, bytes] = {}

    def placeholder(value):
        if not isinstance(value, BrushRle):
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        token = f"{nonce}-{len(rendered)}"
        rendered[f'"{token}"'.encode()] = value.json()
        return token

    text = json.dumps(obj, default=placeholder, separators=(",", ":")).encode()
    for token, rle in rendered.items():
        text = text.replace(token, rle, 1)
    return text


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> (height, width) uint8 mask (the alpha channel), with the sdk's decoder."""
    values = decode_rle(bytes(bytearray(rle)) if not isinstance(rle, bytes) else rle)
    if values.size != height * width * 4:
        raise ValueError(f"RLE holds {values.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return values.reshape(height, width, 4)[:, :, 3]


@dataclass
class BrushRegion:
    """One brush region of an annotation or prediction, decoded."""

    id: str | None
    from_name: str | None
    to_name: str | None
    labels: list[str]
    mask: np.ndarray  # (H, W) bool


def brush_regions(result: list) -> list[BrushRegion]:
    """The brush regions of a Label Studio ``result`` list, decoded; a region whose RLE does not fit its
    declared size is skipped with a warning (one bad region must not lose the others)."""
    regions = []
    for item in result or []:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() != "brushlabels":
            continue
        value = item.get("value") or {}
        if value.get("format") != "rle" or not value.get("rle"):
            continue
        try:
            height, width = int(item["original_height"]), int(item["original_width"])
            mask = rle_to_mask(value["rle"], height, width) > 127
        except (KeyError, TypeError, ValueError) as error:
            log.warning("brush region %s skipped: %s", item.get("id"), error)
            continue
        regions.append(BrushRegion(item.get("id"), item.get("from_name"), item.get("to_name"),
                                   list(value.get("brushlabels") or []), mask))
    return regions


# --- a job's answer as Label Studio regions -----------------------------------------------------------


def regions(kind: str, from_name: str, to_name: str, width: int, height: int, answer: dict,
            labels: list[str], score: float) -> list[dict]:
    """One object's answer (``serving.jobs`` result) as the regions of a ``kind`` target: one brush region
    (RLE), one polygon region per part (points in percent, closed), or one rectangle (the tight box)."""

    def region(region_type: str, value: dict) -> dict:
        return {"id": uuid.uuid4().hex[:10], "from_name": from_name, "to_name": to_name, "type": region_type,
                "original_width": width, "original_height": height, "image_rotation": 0,
                "value": {**value, region_type: labels}, "score": score, "readonly": False}

    if kind == "brush":
        return [region("brushlabels", {"format": "rle", "rle": rle_from_base64(answer["rle_base64"])})]
    if kind == "polygon":
        return [region("polygonlabels", {"points": [[x * 100 / width, y * 100 / height] for x, y in points],
                                         "closed": True})
                for points in answer.get("polygons") or []]
    if kind == "box":
        box = answer.get("box")
        if box is None:
            return []
        x0, y0, x1, y1 = box
        return [region("rectanglelabels", {"x": x0 * 100 / width, "y": y0 * 100 / height,
                                           "width": (x1 - x0) * 100 / width, "height": (y1 - y0) * 100 / height,
                                           "rotation": 0})]
    raise ValueError(f"unknown output kind {kind!r}")
