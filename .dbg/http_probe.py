import sys, time, subprocess, statistics, os, json, signal
sys.path.insert(0, ".")
port = 6393; http_port = 9197
rs = subprocess.Popen([os.environ.get("REDIS_SERVER", "redis-server"), "--port", str(port), "--save", ""], stdout=subprocess.DEVNULL)
time.sleep(0.5)
url = f"redis://127.0.0.1:{port}/0"
n = sys.argv[1] if len(sys.argv) > 1 else "75000"
w = subprocess.Popen([sys.executable, ".dbg/stubworker.py", url, n])
env = dict(os.environ, REDIS_URL=url, PORT=str(http_port), LOG_LEVEL="WARNING", SAMLIGHT_HOST="127.0.0.1")
be = subprocess.Popen([sys.executable, "-m", "backend.serve"], env=env, cwd="/work/main", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
import requests
from workers.client import RQSegmenter
from backend.jobs import SegmentJob
from backend.labels import SMART_CONFIG
seg = RQSegmenter(url)
while not seg.alive_workers(): time.sleep(0.2)
for _ in range(100):
    try: requests.get(f"http://127.0.0.1:{http_port}/health", timeout=1); break
    except Exception: time.sleep(0.3)
s = requests.Session()
point = {"id": "p", "from_name": "point", "to_name": "image", "type": "keypointlabels", "original_width": 640,
         "original_height": 480, "image_rotation": 0, "is_positive": True,
         "value": {"x": 30.0, "y": 40.0, "width": 0.6, "keypointlabels": ["Object"]}}
body = {"tasks": [{"id": 1, "data": {"image": "http://127.0.0.1:1/x.jpg"}}], "label_config": SMART_CONFIG,
        "params": {"context": {"result": [point]}}}
job = SegmentJob(image_url="http://x/a.jpg", image_key="k1", points=[[1.0, 2.0]], point_labels=[1])
def timeit(f, k=60):
    ts = []
    for i in range(k):
        t = time.perf_counter(); f(); ts.append((time.perf_counter()-t)*1000); time.sleep(0.02)
    return statistics.median(ts)
for _ in range(10): s.post(f"http://127.0.0.1:{http_port}/predict", json=body)
r = s.post(f"http://127.0.0.1:{http_port}/predict", json=body); print(r.status_code, len(r.content), r.text[:300] if not r.ok else "")
print("segment p50 %.2f" % timeit(lambda: seg.segment([job])))
print("health GET p50 %.2f" % timeit(lambda: s.get(f"http://127.0.0.1:{http_port}/health")))
from backend.app import create_app
client = create_app(segmenter=seg).test_client()
print("flask in-process p50 %.2f" % timeit(lambda: client.post("/predict", json=body)))
import cProfile, pstats
p = cProfile.Profile(); p.enable()
for i in range(30): client.post("/predict", json=body)
p.disable(); pstats.Stats(p).sort_stats("tottime").print_stats(15)
print("http p50 %.2f" % timeit(lambda: s.post(f"http://127.0.0.1:{http_port}/predict", json=body)))
be.terminate(); w.terminate(); w.wait(); be.wait(); rs.terminate()
