"""The Label Studio ML backend protocol over HTTP: ``create_app()`` for gunicorn.

Endpoints: ``GET /health`` (and ``/``), ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``POST /train``,
``GET /versions``. Errors answer ``{"error": message}`` with a 4xx/5xx status whose reason phrase repeats the
message, because Label Studio shows an ML backend's failure as the HTTP status line it received.
"""

from __future__ import annotations

import hmac
import logging
import re
import threading
import time

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from serving.corrections import CorrectionSink, create_correction_sink
from serving.images import ImageFetcher
from serving.labels import ConfigError, parse_config
from serving.errors import StatusError
from backend.failures import RecentFailures
from backend.adapter import LabelStudioAdapter, Services
from serving.options import ProjectOptions, ProjectOptionsStore, project_key
from serving import labelstudio
from backend.prompts import PromptError
from serving.local_training import LocalTrainingScheduler
from serving.preannotation import create_queue
from serving.registry import model_role
from serving.segmenter import Segmenter, create_segmenter
from backend.settings import BackendSettings

log = logging.getLogger(__name__)


class ApiError(StatusError):
    """A request the API itself rejects (bad JSON, missing fields, no free inference slot)."""


def _reason(message: str) -> str:
    """A one-line ASCII reason phrase (Label Studio displays it)."""
    text = re.sub(r"[^\x20-\x7e]", "?", " ".join(str(message).split()))
    return text[:300]


def error_response(message: str, status: int) -> Response:
    response = jsonify({"error": message})
    response.status = f"{status} {_reason(message)}"
    return response


MAX_JSON_DEPTH = 64  # Label Studio's deepest payloads (annotations in webhooks) nest about 8 levels


def _json_depth_exceeds(data, limit: int) -> bool:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return False


def _json_body() -> dict:
    try:
        data = request.get_json(silent=True, force=True)
    except RecursionError:
        raise ApiError(f"the request JSON is nested more than {MAX_JSON_DEPTH} levels deep", 400) from None
    if data is None:
        raise ApiError("the request body must be JSON", 400)
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}", 400)
    if _json_depth_exceeds(data, MAX_JSON_DEPTH):
        raise ApiError(f"the request JSON is nested more than {MAX_JSON_DEPTH} levels deep", 400)
    return data


def create_app(settings: BackendSettings | None = None, segmenter: Segmenter | None = None,
               sink: CorrectionSink | None = None, fetcher: ImageFetcher | None = None) -> Flask:
    settings = settings or BackendSettings.from_env()
    logging.basicConfig(level=settings.core.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(settings.core.log_level)
    fetcher = fetcher or ImageFetcher.from_settings(settings.core.fetch)
    segmenter = segmenter or create_segmenter(settings.core, fetcher)
    services = Services(segmenter=segmenter, fetcher=fetcher, sink=sink or create_correction_sink(settings.core),
                        preannotations=create_queue(settings.core, segmenter, fetcher), inline_s=settings.auto_inline_s)
    if settings.preload and hasattr(segmenter, "load_in_background"):
        segmenter.load_in_background()
    # the embedded learning loop: with a teacher configured, corrections train new versions in this deployment
    schedule = None
    if not settings.core.redis_url and settings.core.training.teacher and settings.train_schedule:
        schedule = LocalTrainingScheduler(settings.core)
        schedule.start()
    predict_slots = threading.BoundedSemaphore(settings.max_concurrent_predictions)
    project_options = ProjectOptionsStore(settings.core.model_dir / "projects", settings.core.project_defaults)
    failures = RecentFailures()

    app = Flask("samlight-backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["samlight"] = services

    @app.before_request
    def check_basic_auth():
        if not settings.basic_auth_user:
            return None
        auth = request.authorization
        # compared as UTF-8 bytes: compare_digest refuses non-ASCII str, and a client may send any bytes
        ok = (auth is not None and auth.type == "basic"
              and hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
              and hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode()))
        if not ok:
            response = error_response("basic authentication required", 401)
            response.headers["WWW-Authenticate"] = 'Basic realm="samlight"'
            return response
        return None

    def failed(message: str, status: int) -> Response:
        # Label Studio drops a failed click's answer without showing it: /health and the log must show it
        failures.record(request.path, status, message)
        log.warning("%s answered %d: %s", request.path, status, message)
        return error_response(message, status)

    @app.errorhandler(StatusError)  # ApiError, PredictError, JobError, FetchError, OptionsError
    def api_error(error):
        return failed(str(error), error.status)

    @app.errorhandler(ConfigError)
    @app.errorhandler(PromptError)
    def bad_request(error):
        return failed(str(error), 400)

    @app.errorhandler(HTTPException)
    def http_error(error):
        return failed(error.description or error.name, error.code or 500)

    @app.errorhandler(Exception)
    def internal_error(error):
        log.exception("unhandled error on %s", request.path)
        return failed(f"internal error: {error.__class__.__name__}: {error}", 500)

    @app.get("/")
    @app.get("/health")
    def health():
        """UP; DEGRADED (200: clicks are answered, something needs a look); DOWN (503: no click can be)."""
        details = segmenter.health()
        corrections = services.sink.health() if hasattr(services.sink, "health") else {}
        degraded = []
        if corrections.get("pending_local"):
            degraded.append(f"{corrections['pending_local']} correction event(s) wait in the local log for Redis")
        status = "DOWN" if "error" in details else ("DEGRADED" if degraded else "UP")
        version = segmenter.model_version
        body = {"status": status, "model_class": LabelStudioAdapter.__name__, "model_version": version,
                "model_role": model_role(version), **details, "degraded": degraded, "corrections": corrections,
                "failures": failures.summary()}
        if services.preannotations is not None:
            body["preannotation"] = services.preannotations.progress()
        if schedule is not None:
            body["training"] = schedule.health()
        return jsonify(body), 503 if status == "DOWN" else 200

    @app.post("/setup")
    def setup():
        data = _json_body()
        schema = data.get("schema")
        if not isinstance(schema, str):
            raise ApiError("'schema' (the project's labeling config) is required", 400)
        labeling = parse_config(schema)
        options = ProjectOptions.parse(data.get("extra_params"), base=project_options.defaults)
        labeling.select(options.outputs)  # an outputs option that names no target fails Validate and Save
        project = project_key(data.get("project"))
        if project is not None:
            project_options.save(project, data.get("extra_params"))
        version = segmenter.model_version
        return jsonify({"model_version": version, "model_role": model_role(version), "options": options.to_dict()})

    @app.post("/predict")
    def predict():
        data = _json_body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list) or not tasks:
            raise ApiError("'tasks' must be a non-empty list", 400)
        params = data.get("params") or {}
        if not isinstance(params, dict):
            raise ApiError("'params' must be an object", 400)
        label_config = data.get("label_config")
        if not isinstance(label_config, str):
            raise ApiError("'label_config' (the project's labeling config) is required", 400)
        if "extra_params" in data:  # a client that sends its options with every call
            options = ProjectOptions.parse(data["extra_params"], base=project_options.defaults)
        else:
            options = project_options.get(project_key(data.get("project")))
        model = LabelStudioAdapter(services, label_config, options)
        if not predict_slots.acquire(timeout=settings.slot_wait_s):
            raise ApiError(f"the backend is busy: all {settings.max_concurrent_predictions} request slots stayed "
                           f"taken for {settings.slot_wait_s:g}s (raise SAMLIGHT_THREADS)", 503)
        start = time.perf_counter()
        try:
            results = model.predict(tasks, context=params.get("context"))
        finally:
            predict_slots.release()
        log.info("predict: %d task(s), context=%s, %.1f ms", len(tasks), params.get("context") is not None,
                 (time.perf_counter() - start) * 1000)
        body = labelstudio.dumps({"results": results, "model_version": segmenter.model_version})
        return Response(body, mimetype="application/json")

    @app.post("/webhook")
    def webhook():
        data = _json_body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            raise ApiError("'action' is required", 400)
        try:
            outcome = LabelStudioAdapter(services).fit(action, data)
        except OSError as error:
            raise ApiError(f"could not record the {action} event: {error}", 503) from None
        return jsonify(outcome)

    @app.post("/train")
    def train():
        # Label Studio's older "start training" call; recorded like the START_TRAINING webhook
        data = _json_body()
        outcome = LabelStudioAdapter(services).fit("START_TRAINING", {"action": "START_TRAINING", **data})
        return jsonify(outcome)

    @app.get("/versions")
    def versions():
        version = segmenter.model_version
        return jsonify({"versions": segmenter.versions(), "model_version": version, "model_role": model_role(version)})

    return app
