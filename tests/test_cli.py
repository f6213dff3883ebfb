"""The ``samlight`` command line, run as a user runs it."""

from __future__ import annotations

import pytest
import json
import subprocess
import sys

import numpy as np
from PIL import Image


def samlight(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "samlight.cli", *args], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"samlight {' '.join(args)} failed:\n{result.stderr}")
    return result


@pytest.mark.slow
def test_predict_writes_mask_and_overlay(coco_val_images, tmp_path):
    image = coco_val_images[1]
    width, height = Image.open(image).size
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    result = samlight("predict", "--random", "lightening_test", "--image", str(image),
                      "--box", f"10,10,{width // 2},{height // 2}", "--point", "30,40", "--point", "5,5,0",
                      "--out", str(out), "--overlay", str(overlay))
    mask = np.asarray(Image.open(out))
    assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255}
    assert Image.open(overlay).size == (width, height)
    assert "predicted IoU" in result.stdout
    assert "RANDOM WEIGHTS" in result.stderr


@pytest.mark.slow
def test_predict_errors_name_the_problem(coco_val_images, tmp_path):
    image = str(coco_val_images[0])
    cases = [
        (["--random", "lightening_test", "--image", image, "--out", "m.png"], "at least one --point or a --box"),
        (["--random", "lightening_test", "--image", image, "--box", "1,2,3", "--out", "m.png"], "four numbers"),
        (["--random", "lightening_test", "--image", image, "--box", "5000,5000,6000,6000", "--out", "m.png"],
         "outside"),
        (["--random", "lightening_test", "--image", str(tmp_path / "missing.jpg"), "--box", "1,1,5,5",
          "--out", "m.png"], "missing.jpg: cannot be read"),
        (["--random", "nonexistent", "--image", image, "--box", "1,1,5,5", "--out", "m.png"],
         "unknown model config 'nonexistent'"),
    ]
    for args, message in cases:
        result = samlight("predict", *args, check=False)
        assert result.returncode == 2, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_weights_init_info_verify(tmp_path):
    out = tmp_path / "student"
    samlight("weights", "init", "--config", "lightening_test", "--teacher", "random:vit_test", "--out", str(out))
    info = json.loads(samlight("weights", "info", str(out)).stdout)
    assert info["metadata"]["teacher"] == "random:vit_test:0"
    assert "ok" in samlight("weights", "verify", str(out)).stdout
    (out / "model.safetensors").write_bytes(b"garbage")
    result = samlight("weights", "verify", str(out), check=False)
    assert result.returncode == 2 and "does not match" in result.stderr


@pytest.mark.slow
def test_bench_on_cpu_prints_table_and_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    result = samlight("bench", "--models", "lightening_test", "--no-peers", "--repeats", "2", "--json", str(path))
    assert "lightening_test" in result.stdout and "eager ms" in result.stdout and "best ms" in result.stdout
    payload = json.loads(path.read_text())
    row = payload["results"][0]
    assert payload["device"] and payload["date"] and row["params_m"] > 0
    # every model in eager and compiled form on the CPU; the best of them is the reported latency, with its mode
    assert payload["modes"] == ["eager", "compile"] and row["eager_ms"] > 0 and row["compile_ms"] > 0
    assert row["latency_ms"] == min(row["eager_ms"], row["compile_ms"])
    assert row["mode"] == ("eager" if row["latency_ms"] == row["eager_ms"] else "compile")
    # the click on the serving path next to SAM's own decoder
    assert row["prompt_to_mask_host_ms"] > 0 and row["prompt_to_mask_sam_ms"] > 0


@pytest.mark.slow
def test_bench_int8_counts_the_quantized_weights(tmp_path):
    from samlight.modeling.int8_linear import available

    if not available():
        pytest.skip("needs oneDNN's int8 GEMM")
    path = tmp_path / "bench.json"
    samlight("bench", "--models", "lightening_test", "--no-peers", "--no-prompt", "--precision", "fp32", "int8",
             "--repeats", "2", "--json", str(path))
    rows = {row["precision"]: row for row in json.loads(path.read_text())["results"]}
    assert rows["int8"]["latency_ms"] > 0 and rows["int8"]["params_m"] == rows["fp32"]["params_m"]
    # int8 linears; the rest in bf16 where the CPU runs it natively (half the size), else in float32
    import torch

    from samlight.modeling.int8_linear import companion_dtype

    shrink = 2 if companion_dtype() == torch.bfloat16 else 1
    assert rows["int8"]["weights_mb"] < rows["fp32"]["weights_mb"] / shrink
