import sys, time, numpy as np, torch, glob
from samlight.modeling import build_student, seeded, student_config
from samlight.predictor import Predictor
from samlight.image_io import load_image
photo = load_image(sorted(glob.glob(".data/coco_tiny/val2017/*.jpg"))[0])
p = Predictor(seeded(0, build_student, student_config("lightening_t")), device="cuda")
emb = p.embed(photo)
kw = {"point_coords": np.array([[320.0, 240.0]]), "point_labels": np.array([1])}
for _ in range(20): p.predict_brush(emb, **kw)
ts = []
for i in range(100):
    kw["point_coords"] = np.array([[20.0 + 6 * i, 240.0]])
    s = time.perf_counter(); r = p.predict_brush(emb, **kw); ts.append((time.perf_counter() - s) * 1000)
print("predict_brush p50 %.3f ms min %.3f rle bytes %d" % (np.median(ts), min(ts), len(r.rle)))
# split: low-res decode vs the rest
from samlight.predictor import validate_prompts
def phase():
    points, labels, boxes, _ = validate_prompts(kw["point_coords"], kw["point_labels"], None, emb.original_size)
    t0 = time.perf_counter(); low, iou = p._low_res(emb, points, labels, boxes, None, True); torch.cuda.synchronize(); t1 = time.perf_counter()
    best = iou[0].argmax().view(1)
    logits = p.model.postprocess_masks(low[0].index_select(0, best)[None], emb.input_size, emb.original_size)
    mask = logits[0, 0] > 0; torch.cuda.synchronize(); t2 = time.perf_counter()
    from samlight.brush_rle import mask_to_rle_bytes
    mask_to_rle_bytes(mask); t3 = time.perf_counter()
    return (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000
ph = np.array([phase() for _ in range(50)])
print("decode(sync) %.3f  upsample %.3f  rle %.3f ms (p50)" % tuple(np.median(ph, 0)))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for _ in range(10): p.predict_brush(emb, **kw)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=50))
