import sys, base64, os, time
sys.path.insert(0, ".")
from workers.inference import make_worker
from workers.settings import WorkerSettings
import cProfile, pstats, signal

class StubRuntime:
    def __init__(self, n):
        self._results = {}; self.device = "cpu"
        self.blob = base64.b64encode(os.urandom(n)).decode()
    def load_initial(self):
        class S: version = "stub"
        return S()
    def start_background(self, q): 
        import threading
        from workers.settings import connect
        r = connect(settings.redis_url)
        def hb():
            while True:
                r.zadd(settings.keys.heartbeats, {"w"+str(os.getpid()): int(time.time()*1000)}); time.sleep(1)
        threading.Thread(target=hb, daemon=True).start()
    def stop(self): pass
    def run_batch(self, jobs):
        for j in jobs:
            self._results[j.id] = {"rle_base64": self.blob, "width": 640, "height": 480, "score": 0.5, "area": 100, "model_version": "stub", "image_key": "k", "cached": True, "timings_ms": {"decode": 0, "rle": 0}, "t_batch": time.time(), "t_pub": time.time()}
    def take_result(self, job_id):
        return self._results.pop(job_id)
    def publish_replies(self, jobs):
        from workers.runtime import InferenceRuntime
        from workers.settings import connect
        self.settings = settings
        self.redis = getattr(self, "redis", None) or connect(settings.redis_url)
        for j in jobs: self._results[j.id]["t_pub"] = time.time()
        InferenceRuntime.publish_replies(self, jobs)

settings = WorkerSettings.from_env(redis_url=sys.argv[1])
n = int(sys.argv[2])
w = make_worker(settings, "cpu", None, name="w"+str(os.getpid()))
w.runtime_factory = lambda worker: StubRuntime(n)
prof = os.environ.get("PROF")
if prof:
    p = cProfile.Profile(); p.enable()
    def stop(*a):
        p.disable(); pstats.Stats(p).sort_stats("cumulative").dump_stats(prof); sys.exit(0)
    signal.signal(signal.SIGUSR1, stop)
w.work(logging_level="WARNING")
