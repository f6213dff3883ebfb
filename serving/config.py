"""Every setting samlight reads from the environment, read once, in one place: ``Settings.from_env()``.

One tree of dataclasses: the root holds what every process shares (Redis, the state directory, the model
source, image fetching), and one branch per kind of process: ``embedded`` (the in-process model of a backend
without Redis), ``rq`` (inference workers and the backend's RQ client), ``training`` (the DLD job). The HTTP
server's own options (bind, processes, basic auth) are read by ``backend.settings`` with the same reader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from samlight.image_io import ImageLimits
from serving.options import ProjectOptions
from serving.source import ModelSource


class Environment:
    """Reads environment variables with one set of rules: unset or empty means the default, and a value that
    does not parse is a ``ValueError`` naming the variable."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = os.environ if env is None else env

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name)
        return default if value is None or value.strip() == "" else value.strip()

    def integer(self, name: str, default: int) -> int:
        return self._parse(name, default, int, "an integer")

    def number(self, name: str, default: float) -> float:
        return self._parse(name, default, float, "a number")

    def flag(self, name: str, default: bool) -> bool:
        """1/true/yes/on (any case) is on, 0/false/no/off is off."""
        value = self.text(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} must be on or off (1/0, true/false, yes/no), got {value!r}")

    def names(self, name: str) -> tuple[str, ...]:
        """A comma-separated list."""
        return tuple(item.strip() for item in (self.text(name) or "").split(",") if item.strip())

    def _parse(self, name: str, default, kind, what: str):
        value = self.text(name)
        if value is None:
            return default
        try:
            return kind(value)
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {value!r}") from None


@dataclass
class Keys:
    """Every Redis key and channel samlight owns (RQ's own keys live under ``rq:``)."""

    prefix: str = "samlight"

    @property
    def shared_queue(self) -> str:
        return f"{self.prefix}-infer"

    def worker_queue(self, worker: str) -> str:
        return f"{self.prefix}-infer.{worker}"

    # prewarm and batch work: a worker takes these only when no click waits in the queues above
    @property
    def shared_bulk_queue(self) -> str:
        return f"{self.prefix}-bulk"

    def worker_bulk_queue(self, worker: str) -> str:
        return f"{self.prefix}-bulk.{worker}"

    def inference_queues(self, worker: str) -> list[str]:
        """An inference worker's queues in the order it takes jobs from them: clicks first."""
        return [self.worker_queue(worker), self.shared_queue, self.worker_bulk_queue(worker), self.shared_bulk_queue]

    @property
    def preannotation(self) -> str:  # hash: background pre-annotation counts (submitted, posted, failed, ...)
        return f"{self.prefix}:preannotation"

    @property
    def training_queue(self) -> str:
        return f"{self.prefix}-training"

    def alive(self, worker: str) -> str:
        return f"{self.prefix}:infer:alive:{worker}"

    @property
    def heartbeats(self) -> str:  # sorted set worker -> last heartbeat (ms since epoch)
        return f"{self.prefix}:infer:heartbeats"

    def reply(self, job_id: str) -> str:  # list the worker pushes a click's result onto (the backend BLPOPs)
        return f"{self.prefix}:reply:{job_id}"

    def image_route(self, image_key: str) -> str:
        return f"{self.prefix}:route:{image_key}"

    @property
    def active_version(self) -> str:
        return f"{self.prefix}:model:active"

    @property
    def last_good_version(self) -> str:  # the last registry version a worker loaded and served
        return f"{self.prefix}:model:last-good"

    @property
    def version_channel(self) -> str:
        return f"{self.prefix}:model:events"

    def worker_model(self, worker: str) -> str:
        return f"{self.prefix}:infer:model:{worker}"

    @property
    def corrections(self) -> str:  # hash annotation id -> JSON correction
        return f"{self.prefix}:corrections"

    @property
    def correction_stream(self) -> str:  # append-only event stream (AOF-persisted)
        return f"{self.prefix}:corrections:stream"

    @property
    def corrections_since_training(self) -> str:
        return f"{self.prefix}:corrections:new"

    @property
    def training_requests(self) -> str:
        return f"{self.prefix}:training:requests"

    @property
    def cron_lock(self) -> str:
        return f"{self.prefix}:cron:lock"

    @property
    def training_job_id(self) -> str:
        return f"{self.prefix}-dld"


@dataclass
class WorkerSettings:
    """Inference workers and the backend's RQ client."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    model_dir: Path = Path("models")
    keys: Keys = field(default_factory=Keys)
    deadline_ms: int = 5000  # a click's whole budget: queue wait + inference
    prewarm_deadline_ms: int = 60000
    max_batch: int = 8  # jobs a worker drains into one model call
    # how long a batch waits for its images; slower ones go on downloading in the background
    fetch_wait_ms: int = 2000
    cache_entries: int = 256  # embeddings a worker keeps (a 1024² image's is 4 MB)
    refine_entries: int = 1024  # clicks whose logits a worker keeps for the next click (256 KB each)
    route_ttl_s: int = 600  # how long an image -> worker route is trusted
    reply_ttl_s: int = 60  # a click's reply list outlives a backend that stopped waiting this long
    alive_ttl_ms: int = 1500  # worker liveness key; heartbeat every third of it
    train_every_hours: float = 0.0  # 0 = no time-based schedule
    train_after_corrections: int = 0  # 0 = no count-based trigger
    gate_margin: float = 0.02  # candidate may be this much mIoU below the active version
    # ...and must follow the teacher on held-out images: mask IoU to the teacher's masks under the same prompts.
    # A little under the distillation recipe's targets (0.93 box, 0.85 one point on unseen COCO photos): a
    # broken or undertrained student falls well below, a good one's held-out variance stays above.
    gate_teacher_box_iou: float = 0.85
    gate_teacher_point_iou: float = 0.75
    holdout_fraction: float = 0.2
    training_timeout_s: int = 6 * 3600
    # CPU workers: bf16 + torch.compile, or int8 linears + torch.compile (samlight.predictor.cpu_encoder_options);
    # a new model version compiles during its warm-up, before it is swapped in
    cpu_fast: bool = False
    cpu_int8: bool = False
    rq_log_level: str = "WARNING"  # RQ logs three lines per job at INFO: noise on a click path

    @property
    def corrections_dir(self) -> Path:
        return Path(self.model_dir) / "corrections"


@dataclass(frozen=True)
class FetchSettings:
    label_studio_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 15.0  # the whole fetch: connect, redirects, headers and body
    limits: ImageLimits = ImageLimits()
    allow: tuple[str, ...] = ()  # extra networks / host names images may come from (private ones included)
    failure_ttl_s: float = 10.0  # how long a failed fetch is answered from memory


@dataclass
class EmbeddedSettings:
    """The model a backend without Redis runs in its own processes."""

    device: str | None = None  # None: CUDA when available
    cache_entries: int = 64
    refine_entries: int = 256  # clicks whose logits are kept for the next click (256 KB each)
    torch_threads: int | None = None  # None: torch's default
    prewarm_threads: int = 1
    # on the CPU: bf16 encoder weights where oneDNN runs them natively, and torch.compile of the encoder
    # (~2x the fp32 default on AVX512-BF16; the warm-up pays the compilation)
    cpu_fast: bool = False
    # on the CPU: the encoder blocks' linears as int8 GEMMs (VNNI/AMX), compiled; ~25% under cpu_fast,
    # with a small accuracy cost
    cpu_int8: bool = False
    # model calls at once; a click waits up to slot_wait_s for one (before prewarm work), then gets a 503
    inference_slots: int = 2
    slot_wait_s: float = 5.0


@dataclass
class TrainingSettings:
    teacher: str | None = None  # SAMLIGHT_TEACHER: "vit_h:/w/sam_vit_h.pth" or "random:vit_test"
    student_config: str = "lightening_t"  # the student to start from when no version is active
    encoder_steps: int = 200
    decoder_steps: int = 100
    batch_size: int = 4
    # the distillation recipe's levers (docs/benchmarks.md, run 7: 0.5 and 0.3 on a GPU); each costs CPU time
    augment: float = 0.0
    output_weight: float = 0.0
    min_corrections: int = 2
    max_project_images: int = 2000  # the connected projects' images a run also learns from (0: corrections only)
    device: str | None = None


@dataclass
class Settings:
    """The whole configuration of a samlight process."""

    redis_url: str | None = None  # None: the embedded mode (no Redis, the model in the backend's processes)
    model_dir: Path = Path("models")
    log_level: str = "INFO"
    model: ModelSource = field(default_factory=ModelSource)
    fetch: FetchSettings = field(default_factory=FetchSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    rq: WorkerSettings = field(default_factory=WorkerSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    project_defaults: ProjectOptions = field(default_factory=ProjectOptions)  # what a project's extra_params override

    def __post_init__(self) -> None:
        # the RQ branch carries the root's Redis URL and state directory: RQ code needs only its branch
        self.rq.model_dir = self.model_dir
        if self.redis_url:
            self.rq.redis_url = self.redis_url

    @property
    def corrections_dir(self) -> Path:
        return self.rq.corrections_dir

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        read = Environment(env)
        redis_url = read.text("REDIS_URL")
        model_dir = Path(read.text("MODEL_DIR", "models"))
        cpu_fast, cpu_int8 = read.flag("SAMLIGHT_CPU_FAST", False), read.flag("SAMLIGHT_CPU_INT8", False)
        limits = ImageLimits()
        threads = read.integer("SAMLIGHT_TORCH_THREADS", 0)
        return cls(
            redis_url=redis_url,
            model_dir=model_dir,
            log_level=read.text("LOG_LEVEL", "INFO").upper(),
            model=ModelSource(checkpoint=read.text("SAMLIGHT_CHECKPOINT"), random=read.text("SAMLIGHT_RANDOM"),
                              seed=read.integer("SAMLIGHT_SEED", 0), test_model=read.text("SAMLIGHT_TEST_MODEL")),
            fetch=FetchSettings(
                label_studio_url=read.text("LABEL_STUDIO_URL") or read.text("LABEL_STUDIO_HOST"),
                api_key=read.text("LABEL_STUDIO_API_KEY"),
                timeout_s=read.number("SAMLIGHT_FETCH_TIMEOUT", 15.0),
                limits=ImageLimits(max_bytes=read.integer("SAMLIGHT_MAX_IMAGE_BYTES", limits.max_bytes),
                                   max_pixels=read.integer("SAMLIGHT_MAX_IMAGE_PIXELS", limits.max_pixels)),
                allow=read.names("SAMLIGHT_FETCH_ALLOW"),
                failure_ttl_s=read.number("SAMLIGHT_FETCH_FAILURE_TTL", 10.0),
            ),
            embedded=EmbeddedSettings(
                device=read.text("SAMLIGHT_DEVICE"),
                cache_entries=read.integer("SAMLIGHT_CACHE_ENTRIES", EmbeddedSettings.cache_entries),
                refine_entries=read.integer("SAMLIGHT_REFINE_ENTRIES", EmbeddedSettings.refine_entries),
                torch_threads=threads or None,
                cpu_fast=cpu_fast, cpu_int8=cpu_int8,
            ),
            rq=WorkerSettings(
                keys=Keys(read.text("SAMLIGHT_REDIS_PREFIX", "samlight")),
                deadline_ms=read.integer("SAMLIGHT_DEADLINE_MS", WorkerSettings.deadline_ms),
                prewarm_deadline_ms=read.integer("SAMLIGHT_PREWARM_DEADLINE_MS", WorkerSettings.prewarm_deadline_ms),
                max_batch=read.integer("SAMLIGHT_MAX_BATCH", WorkerSettings.max_batch),
                fetch_wait_ms=read.integer("SAMLIGHT_FETCH_WAIT_MS", WorkerSettings.fetch_wait_ms),
                # one knob for both modes; SAMLIGHT_WORKER_CACHE_ENTRIES is its old name on the workers
                cache_entries=read.integer("SAMLIGHT_CACHE_ENTRIES", read.integer(
                    "SAMLIGHT_WORKER_CACHE_ENTRIES", WorkerSettings.cache_entries)),
                refine_entries=read.integer("SAMLIGHT_REFINE_ENTRIES", WorkerSettings.refine_entries),
                route_ttl_s=read.integer("SAMLIGHT_ROUTE_TTL_S", WorkerSettings.route_ttl_s),
                alive_ttl_ms=read.integer("SAMLIGHT_ALIVE_TTL_MS", WorkerSettings.alive_ttl_ms),
                train_every_hours=read.number("SAMLIGHT_TRAIN_EVERY_HOURS", WorkerSettings.train_every_hours),
                train_after_corrections=read.integer("SAMLIGHT_TRAIN_AFTER_CORRECTIONS",
                                                     WorkerSettings.train_after_corrections),
                gate_margin=read.number("SAMLIGHT_GATE_MARGIN", WorkerSettings.gate_margin),
                gate_teacher_box_iou=read.number("SAMLIGHT_GATE_TEACHER_BOX_IOU", WorkerSettings.gate_teacher_box_iou),
                gate_teacher_point_iou=read.number("SAMLIGHT_GATE_TEACHER_POINT_IOU",
                                                   WorkerSettings.gate_teacher_point_iou),
                holdout_fraction=read.number("SAMLIGHT_HOLDOUT_FRACTION", WorkerSettings.holdout_fraction),
                training_timeout_s=read.integer("SAMLIGHT_TRAINING_TIMEOUT_S", WorkerSettings.training_timeout_s),
                cpu_fast=cpu_fast, cpu_int8=cpu_int8,
                rq_log_level=read.text("RQ_LOG_LEVEL", WorkerSettings.rq_log_level).upper(),
            ),
            training=TrainingSettings(
                teacher=read.text("SAMLIGHT_TEACHER"),
                student_config=read.text("SAMLIGHT_STUDENT_CONFIG", TrainingSettings.student_config),
                encoder_steps=read.integer("SAMLIGHT_TRAIN_ENCODER_STEPS", TrainingSettings.encoder_steps),
                decoder_steps=read.integer("SAMLIGHT_TRAIN_DECODER_STEPS", TrainingSettings.decoder_steps),
                batch_size=read.integer("SAMLIGHT_TRAIN_BATCH", TrainingSettings.batch_size),
                augment=read.number("SAMLIGHT_TRAIN_AUGMENT", TrainingSettings.augment),
                output_weight=read.number("SAMLIGHT_TRAIN_OUTPUT_WEIGHT", TrainingSettings.output_weight),
                min_corrections=read.integer("SAMLIGHT_TRAIN_MIN_CORRECTIONS", TrainingSettings.min_corrections),
                max_project_images=read.integer("SAMLIGHT_TRAIN_MAX_PROJECT_IMAGES",
                                                TrainingSettings.max_project_images),
                device=read.text("SAMLIGHT_TRAIN_DEVICE"),
            ),
            project_defaults=_project_defaults(read),
        )


def _project_defaults(read: Environment) -> ProjectOptions:
    """The per-project options' deployment-wide values: ``SAMLIGHT_<KEY>`` for each key of ``extra_params``."""
    given = {"prewarm": read.flag("SAMLIGHT_PREWARM", None),
             "min_score": read.number("SAMLIGHT_MIN_SCORE", None),
             "outputs": read.names("SAMLIGHT_OUTPUTS") or None,
             "min_area": read.integer("SAMLIGHT_MIN_AREA", None),
             "largest_only": read.flag("SAMLIGHT_LARGEST_ONLY", None),
             "polygon_tolerance": read.number("SAMLIGHT_POLYGON_TOLERANCE", None),
             "refine": read.flag("SAMLIGHT_REFINE", None),
             "auto_annotate": read.flag("SAMLIGHT_AUTO_ANNOTATE", None),
             "auto_label": read.text("SAMLIGHT_AUTO_LABEL"),
             "auto_points_per_side": read.integer("SAMLIGHT_AUTO_POINTS_PER_SIDE", None),
             "auto_pred_iou": read.number("SAMLIGHT_AUTO_PRED_IOU", None),
             "auto_stability": read.number("SAMLIGHT_AUTO_STABILITY", None),
             "auto_box_nms": read.number("SAMLIGHT_AUTO_BOX_NMS", None),
             "auto_crop_layers": read.integer("SAMLIGHT_AUTO_CROP_LAYERS", None)}  # None: unset
    return ProjectOptions().updated({key: value for key, value in given.items() if value is not None},
                                    name=lambda key: f"SAMLIGHT_{key.upper()}")


def connect(redis_url: str, timeout_s: float = 2.0):
    """A Redis client that fails fast instead of hanging (backend threads must never block long)."""
    import redis

    return redis.Redis.from_url(
        redis_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, health_check_interval=30
    )
