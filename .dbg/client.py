import sys, time, subprocess, statistics, os
sys.path.insert(0, ".")
port = 6391
n = int(sys.argv[1]) if len(sys.argv) > 1 else 75000
rs = subprocess.Popen([os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(port), "--save", ""], stdout=subprocess.DEVNULL)
time.sleep(0.5)
url = f"redis://127.0.0.1:{port}/0"
w = subprocess.Popen([sys.executable, ".dbg/stubworker.py", url, str(n)])
from workers.client import RQSegmenter
from backend.jobs import SegmentJob
seg = RQSegmenter(url)
while not seg.alive_workers(): time.sleep(0.2)
job = SegmentJob(image_url="http://x/a.jpg", image_key="k1", points=[[1.0, 2.0]], point_labels=[1])
for i in range(20): seg.segment([job])
ts = []; parts = []
orig_submit = seg._submit
def timed_submit(*a, **k):
    global t_sub
    out = orig_submit(*a, **k); t_sub = time.time(); return out
seg._submit = timed_submit
for i in range(100):
    t0 = time.time(); t = time.perf_counter(); r = seg.segment([job])[0]; ts.append((time.perf_counter()-t)*1000)
    t_end = time.time(); time.sleep(0.05)
    parts.append(((t_sub - t0)*1000, (r["t_batch"]-t_sub)*1000, (r["t_pub"]-r["t_batch"])*1000, (t_end-r["t_pub"])*1000))
import numpy as np
print("submit, ->batch, batch->pub, pub->back ms p50:", np.median(np.array(parts), axis=0).round(2))
print("n", n, "p50 %.2f ms  min %.2f" % (statistics.median(ts), min(ts)), r.keys() if "error" in r else "")
import signal; w.send_signal(signal.SIGUSR1); time.sleep(2); w.terminate(); w.wait(); rs.terminate()
