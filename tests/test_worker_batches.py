"""The order in which an inference worker answers a drained batch (serving.engine.InferenceRuntime)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from serving.config import Settings
from serving.engine import InferenceRuntime
from serving.source import ModelSource


def job(job_id: str, kind: str, image_key: str) -> SimpleNamespace:
    """An RQ job as the worker sees it: its JSON payload under kwargs."""
    return SimpleNamespace(id=job_id, kwargs={"payload": {"kind": kind, "job": {
        "image_key": image_key, "image_url": f"http://images/{image_key}.jpg"}}})


def test_clicks_on_embedded_images_are_answered_before_jobs_that_need_the_encoder(tmp_path):
    settings = dataclasses.replace(Settings.from_env().rq, model_dir=tmp_path)
    runtime = InferenceRuntime(settings, None, "w0", "cpu", ModelSource(random="lightening_test"), fetcher=object())
    runtime.load_initial()
    runtime.served.predictor.embed(np.full((48, 64, 3), 90, dtype=np.uint8), key="embedded")
    batch = [job("prewarm-new", "prewarm", "new"), job("click-new", "click", "new"),
             job("click-1", "click", "embedded"), job("prewarm-embedded", "prewarm", "embedded"),
             job("click-2", "click", "embedded")]
    order = [[j.id for j in part] for part in runtime.answer_order(batch)]
    # the two clicks on the embedded image first, in arrival order; everything else in one pass after
    assert order == [["click-1", "click-2"], ["prewarm-new", "click-new", "prewarm-embedded"]]
    # a batch with nothing to put first stays one pass
    assert [[j.id for j in part] for part in runtime.answer_order(batch[:2])] == [["prewarm-new", "click-new"]]
