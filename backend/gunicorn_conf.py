"""gunicorn settings for the backend: ``gunicorn -c backend/gunicorn_conf.py 'backend.app:create_app()'``.

Threads (gthread) serve concurrent requests of one process, which shares one model and its embedding cache;
every process loads its own model (embedded mode), so keep ``SAMLIGHT_WORKERS`` small on CPU.
"""

from backend.settings import BackendSettings

_settings = BackendSettings.from_env()

bind = f"{_settings.host}:{_settings.port}"
workers = _settings.workers
worker_class = "gthread"
threads = _settings.threads
# the app (and the model) is created in each worker, never in the master: torch and CUDA do not survive fork
preload_app = False
# no control socket: several backends (tests, other services) run side by side on one machine
control_socket_disable = True
# gthread workers heartbeat from their main loop, so a long inference does not trip this
timeout = 120
graceful_timeout = 30
keepalive = 5
loglevel = _settings.core.log_level.lower()
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
