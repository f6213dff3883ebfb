"""samlight's product core, shared by the HTTP backend (``backend/``) and the RQ processes (``workers/``).

No Flask and no worker loop here; ``backend`` and ``workers`` import this package and never each other, and
this package imports neither. Torch is imported only where a model runs (``engine``, the embedded path of
``segmenter``), so the backend's request path stays torch-free when inference runs on workers.

- ``config``            ``Settings.from_env()``: every setting, read once (branches: embedded, rq, fetch,
                        training), Redis ``Keys`` and ``connect``
- ``errors``            ``StatusError``: a message and the HTTP status it maps to
- ``images``            ``ImageFetcher``: task image URLs -> RGB arrays (token rules, limits, one deadline)
- ``outbound``          which addresses image fetches may connect to
- ``jobs``              ``SegmentJob`` (JSON: a click's objects and outputs) and its execution against a predictor
- ``outputs``           a mask cleaned up, as polygons, as its tight box (OpenCV; where the mask is)
- ``refinement``        ``MaskMemory``: the last clicks' low-res logits, what the next click refines
- ``options``           per-project options (Label Studio's "extra params") over the deployment's defaults
- ``labelstudio``       Label Studio's brush RLE, both ways; a job's answer as regions; ``brush_regions``
- ``segmenter``         the ``Segmenter`` protocol and the embedded (in-process) implementation
- ``remote``            ``RQSegmenter``: the same protocol over Redis and the inference workers
- ``engine``            ``ModelHolder`` (every process's model: predictor, warm-up, swap) and
                        ``InferenceRuntime`` (a worker's hot reload and batched execution)
- ``registry``          model versions under ``MODEL_DIR/versions``, the active one in Redis
- ``corrections``       webhook events: checks, the embedded log, ``create_correction_sink``
- ``correction_stream`` the Redis stream of corrections and its fsynced local fallback log
- ``schedule``          enqueueing the (single) DLD training job
- ``source``            ``ModelSource``: the checkpoint, random config or test model a process serves
                        (resolved by ``samlight.models.ModelSpec``)
- ``testing``           a test-only deterministic "geometry" model
"""
