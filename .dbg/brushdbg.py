import sys, copy, numpy as np, torch
sys.path.insert(0, "tests")
from samlight.modeling import build_student, seeded, student_config
from samlight.predictor import Predictor
from samlight.image_io import load_image
from backend.rle import rle_to_mask
import glob
photo = load_image(sorted(glob.glob(".data/coco_tiny/val2017/*.jpg"))[0])
m = seeded(0, build_student, student_config("lightening_test"))
p = Predictor(m, device="cuda")
emb = p.embed(photo)
kw = {"point_coords": np.array([[320.0, 240.0]]), "point_labels": np.array([1])}
for i in range(3):
    full = p.predict_embedding(emb, **kw)
    brush = p.predict_brush(emb, **kw)
    mask = rle_to_mask(list(brush.rle), 480, 640) > 0
    print("scores", full.scores, "brush", brush.score, "area", brush.area, [int((mask != full.masks[c]).sum()) for c in range(3)])
low, iou = p._low_res(emb, *[None]*0, points=None, labels=None, boxes=None, mask_input=None, multimask_output=True) if False else (None, None)
