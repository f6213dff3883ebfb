"""Prompt decoder on a GPU: the graphed decoder as it is, and with torch.compile (inductor, default mode) inside
its graphs; GPU time per replay, kernel counts, compile time and the difference in outputs. Writes
$OUT/decoder-variants.json (or /tmp). Usage on the device: source bench/gpu_env.sh; python3 bench/decoder_variants.py"""
import json
import os
import statistics
import sys
import time

import torch

from samlight.graphed_decoder import GraphedPromptDecoder
from samlight.models import ModelSpec

out_dir = os.environ.get("OUT", "/tmp")
dev = torch.device("cuda")
model = ModelSpec.random("lightening_t").load().to(dev).eval()
features = torch.randn(1, 256, 64, 64, device=dev)
boxes = torch.tensor([[100.0, 80.0, 700.0, 600.0]], device=dev)
coords = torch.tensor([[[300.0, 200.0], [500.0, 400.0]]], device=dev)
labels = torch.tensor([[1, 0]], device=dev, dtype=torch.int)

def time_call(fn, n=300):
    for _ in range(20): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
    return statistics.median(ts)

def kernels(fn):
    from torch.profiler import profile, ProfilerActivity
    fn(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:  # (kernels, their summed GPU ms)
        fn(); torch.cuda.synchronize()
    evs = [e for e in p.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(evs), sum(e.device_time for e in evs) / 1e3

results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
base = GraphedPromptDecoder(model, autocast=True)
cases = {"box": (None, None, boxes, False), "box_multimask": (None, None, boxes, True), "2points": (coords, labels, None, True)}
ref = {k: base(features, *v) for k, v in cases.items()}
for k, v in cases.items():
    results[f"graph_{k}_ms"] = time_call(lambda: base(features, *v))
results["graph_box_kernels"] = kernels(lambda: base(features, *cases["box"]))
for mode in ("default", "max-autotune-no-cudagraphs"):
    if mode != "default" and "--autotune" not in sys.argv:
        continue
    comp = GraphedPromptDecoder(model, autocast=True)
    comp._decode = torch.compile(comp._decode, mode=None if mode == "default" else mode, dynamic=False)
    t = time.perf_counter()
    try:
        outs = {k: comp(features, *v) for k, v in cases.items()}
    except Exception as e:
        results[f"{mode}_error"] = str(e)[:400]; print(e); continue
    results[f"{mode}_compile_s"] = time.perf_counter() - t
    for k, v in cases.items():
        results[f"{mode}_{k}_ms"] = time_call(lambda: comp(features, *v))
        results[f"{mode}_{k}_max_abs_diff_logits"] = (outs[k][0] - ref[k][0]).abs().max().item()
        results[f"{mode}_{k}_max_abs_diff_iou"] = (outs[k][1] - ref[k][1]).abs().max().item()
    results[f"{mode}_box_kernels"] = kernels(lambda: comp(features, *cases["box"]))
print(json.dumps(results, indent=1))
json.dump(results, open(f"{out_dir}/decoder-variants.json", "w"), indent=1)
