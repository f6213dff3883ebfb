"""samlight's Label Studio ML backend (Flask app served by gunicorn).

Modules (each has one job):

- ``app``          ``create_app()``: the HTTP protocol (/health, /setup, /predict, /webhook, /versions), basic auth
- ``model``        ``SamLightModel``: label-studio-ml 2.x style ``predict(tasks, context)`` / ``fit(event, data)``
- ``labels``       the labeling config (label_studio_sdk): BrushLabels + KeyPointLabels/RectangleLabels
- ``prompts``      Label Studio context results (percent) -> pixel prompts
- ``jobs``         ``SegmentJob`` (JSON) and ``execute(job, predictor, fetcher)`` -> JSON result with brush RLE
- ``segmenter``    the ``Segmenter`` protocol, ``InProcessSegmenter``, ``create_segmenter``
- ``images``       ``ImageFetcher``: Label Studio URLs, tokens, limits, clear errors
- ``rle``          Label Studio brush RLE (vectorised encoder, byte-identical to label_studio_sdk's)
- ``corrections``  ``CorrectionSink`` / ``FileCorrectionSink`` for webhooks; ``annotation_masks``
- ``settings``     ``BackendSettings.from_env()``; ``gunicorn_conf`` and ``serve`` start the server
- ``testing``      a test-only deterministic "geometry" model (``SAMLIGHT_TEST_MODEL=geometry``) for e2e checks

Interface for the RQ workers (``workers/``):

- ``backend.images.ImageFetcher(label_studio_url, api_key, limits, timeout_s)`` or ``ImageFetcher.from_env()``:
  ``fetch(url) -> np.ndarray`` (H, W, 3) uint8, ``image_key(url) -> str`` (stable across processes),
  ``FetchError(status)`` on failure.
- ``backend.jobs.SegmentJob`` (``to_dict`` / ``from_dict``; pixels; ``prewarm_only``),
  ``execute(job, predictor, fetcher, model_version) -> dict`` (raises ``JobError``/``FetchError`` with
  ``.status``), ``run_job(job_dict, predictor, fetcher, model_version) -> dict`` (never raises for bad input:
  ``{"error", "status"}``).
- ``backend.segmenter.Segmenter`` protocol: ``model_version`` (property, cheap), ``segment(jobs) -> list[dict]``
  (one per job, errors as ``{"error", "status"}``), ``prewarm(jobs)`` (returns at once), ``health() -> dict``
  (fast), ``versions() -> list[str]``. With ``REDIS_URL`` set, ``create_segmenter`` builds
  ``workers.client.RQSegmenter(redis_url, fetcher=ImageFetcher)``.
- ``backend.corrections.CorrectionSink``: ``record(event: dict)`` (durable before returning; raises on
  failure); ``FileCorrectionSink(MODEL_DIR / "corrections")``. ``backend.app.create_app(sink=...)`` accepts
  another sink; with ``REDIS_URL`` set the app asks ``workers.client.correction_sink(redis_url, fallback)``
  when that function exists.
"""
