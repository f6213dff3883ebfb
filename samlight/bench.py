"""``samlight bench``: image-encoder latency, peak memory and throughput, samlight next to its peers.

Every model runs with random weights (speed does not depend on them) at 1024x1024 input, in one run,
so the ratios compare like with like. On CUDA, times are CUDA-event medians after warm-up; on CPU,
wall-clock medians over fewer repetitions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from samlight.modeling.int8_linear import Int8Linear, int8_encoder
from samlight.models import ModelSpec

log = logging.getLogger(__name__)

SAMLIGHT_MODELS = ("lightening_t", "lightening_s")
SAM_MODELS = ("vit_b", "vit_h")


@dataclass
class Entry:
    """One encoder in one precision mode."""

    name: str
    family: str  # "samlight" or "peer"
    precision: str  # fp32, bf16, int8 (CPU: int8 linears, bf16 elsewhere)
    build: Callable[[], nn.Module]
    mode: str = "eager"  # eager, compile, graph


@dataclass
class Result:
    name: str
    family: str
    precision: str
    mode: str
    params_m: float
    input_size: int | None = None
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    peak_mb: float | None = None
    weights_mb: float | None = None
    throughput_batch: int | None = None
    throughput_img_s: float | None = None
    prompt_to_mask_ms: float | None = None  # on the device (kernels only)
    prompt_to_mask_host_ms: float | None = None  # including the mask's copy to host memory
    vs_sam_vit_h_fp32: float | None = None
    vs_fastest_peer: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _peer_entries(precisions: list[str]) -> list[Entry]:
    """SAM ViT-B/H from segment_anything plus any other light SAM that is installed."""
    entries = []
    for name in SAM_MODELS:
        for precision in precisions:
            entries.append(Entry(f"sam_{name}", "peer", precision, lambda n=name: ModelSpec.random(n).load().image_encoder))
    if importlib.util.find_spec("mobile_sam") is not None:
        def mobile_sam() -> nn.Module:
            from mobile_sam import sam_model_registry

            return sam_model_registry["vit_t"]().image_encoder

        entries += [Entry("mobile_sam", "peer", p, mobile_sam) for p in precisions]
    if importlib.util.find_spec("efficientsam") is not None:
        def efficientvit_sam() -> nn.Module:
            from efficientsam.sam_model_zoo import create_efficientvit_sam_model

            model = create_efficientvit_sam_model("efficientvit-sam-l0", pretrained=False)
            encoder = model.image_encoder
            encoder.img_size = model.image_size[1]  # EfficientViT-SAM encodes at 512x512
            return encoder

        entries += [Entry("efficientvit_sam_l0", "peer", p, efficientvit_sam) for p in precisions]
    return entries


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - started))
    return times


def _prepare(entry: Entry, device: torch.device) -> tuple[nn.Module, torch.dtype]:
    model = entry.build().eval().to(device)
    if entry.precision == "int8":
        model = int8_encoder(model)
    dtype = torch.float32 if entry.precision == "fp32" else torch.bfloat16
    if dtype != torch.float32:
        model = model.to(dtype)
    return model, dtype


def _weights(model: nn.Module) -> tuple[int, int]:
    """(parameter count, bytes), counting int8 linears' weights too."""
    count = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            biases = 0 if layer.bias is None else layer.out_features
            count += layer.in_features * layer.out_features + biases
            size += layer.in_features * layer.out_features + 4 * (layer.out_features + biases)  # int8, fp32 scale, bias
    return count, size


def _runner(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], torch.Tensor]:
    if mode == "compile":
        compiled = torch.compile(model, mode="max-autotune-no-cudagraphs", fullgraph=False)
        return lambda: compiled(x)
    if mode == "graph":
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static)
        return lambda: graph.replay()
    return lambda: model(x)


def measure(entry: Entry, device: torch.device, repeats: int, batch: int, latency: bool = True) -> Result:
    model, dtype = _prepare(entry, device)
    params, weight_bytes = _weights(model)
    result = Result(entry.name, entry.family, entry.precision, entry.mode, params / 1e6,
                    weights_mb=weight_bytes / 2**20)
    size = getattr(model, "img_size", 1024)
    result.input_size = size
    warmup = 3 if device.type == "cuda" else 1
    with torch.inference_mode():
        if latency:
            x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
            run = _runner(model, x, entry.mode)
            if device.type == "cuda":
                run()
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                run()
                torch.cuda.synchronize(device)
                result.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
            times = time_ms(run, device, repeats, warmup)
            result.latency_ms = statistics.median(times)
            result.latency_spread_ms = (max(times) - min(times)) if len(times) > 1 else 0.0
            del run, x
        if batch > 1:
            result.throughput_batch, result.throughput_img_s = _throughput(model, entry, device, dtype, size, batch,
                                                                           max(2, repeats // 10))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def measure_prompt_to_mask(name: str, device: torch.device, repeats: int) -> tuple[float, float]:
    """Box prompt -> mask at 640x480 with the embedding cached: (ms on the device, ms incl. copy to host)."""
    import numpy as np

    from samlight.predictor import Predictor

    predictor = Predictor(ModelSpec.random(name).load(), device=device)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    embedding = predictor.embed(image)
    box = np.array([[100.0, 80.0, 400.0, 360.0]])
    on_device = time_ms(lambda: predictor._decode(embedding, None, None, box, None, False), device, repeats, 3)
    to_host = time_ms(lambda: predictor.predict_embedding(embedding, box=box[0], multimask_output=False), device,
                       repeats, 3)
    return statistics.median(on_device), statistics.median(to_host)


def _throughput(model, entry, device, dtype, size, batch, repeats) -> tuple[int, float]:
    """Images/s at ``batch``, halving the batch while it does not fit in memory."""
    while batch >= 1:
        try:
            x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            times = time_ms(_runner(model, x, entry.mode), device, repeats, warmup=1)
            return batch, 1000 * batch / statistics.median(times)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError("does not fit in memory at batch 1")


def add_ratios(results: list[Result]) -> None:
    ok = [r for r in results if r.latency_ms]
    reference = next((r.latency_ms for r in ok if r.name == "sam_vit_h" and r.precision == "fp32"), None)
    peers = [r.latency_ms for r in ok if r.family == "peer"]
    fastest_peer = min(peers) if peers else None
    for r in ok:
        if reference:
            r.vs_sam_vit_h_fp32 = reference / r.latency_ms
        if fastest_peer and r.family == "samlight":
            r.vs_fastest_peer = fastest_peer / r.latency_ms


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[Result]) -> str:
    header = (f"{'model':<22}{'prec':<6}{'mode':<8}{'input':>6}{'params M':>9}{'latency ms':>12}{'peak MB':>9}"
              f"{'img/s (b)':>15}{'x ViT-H fp32':>13}{'x best peer':>12}")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<22}{r.precision:<6}{r.mode:<8}  error: {r.error}")
            continue
        tput = "-" if r.throughput_img_s is None else f"{r.throughput_img_s:.1f} ({r.throughput_batch})"
        lines.append(
            f"{r.name:<22}{r.precision:<6}{r.mode:<8}{_fmt(r.input_size, 'd'):>6}{r.params_m:>9.1f}"
            f"{_fmt(r.latency_ms, '.3f'):>12}"
            f"{_fmt(r.peak_mb, '.0f'):>9}{tput:>15}{_fmt(r.vs_sam_vit_h_fp32, '.1f'):>13}"
            f"{_fmt(r.vs_fastest_peer, '.1f'):>12}"
        )
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def entries_for(args: argparse.Namespace, device: torch.device) -> list[Entry]:
    cpu_bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" or cpu_bf16 else ["fp32"])
    modes = args.mode or ["eager"]
    entries = [
        Entry(name, "samlight", p, lambda n=name: ModelSpec.random(n).load().image_encoder, mode)
        for name in args.models or SAMLIGHT_MODELS for p in precisions for mode in modes
    ]
    if "int8" in precisions and device.type != "cpu":
        raise ValueError("--precision int8 (oneDNN int8 linears) runs on the CPU only")
    peers = [] if args.no_peers else _peer_entries([p for p in precisions if p != "int8"])
    if device.type == "cpu" and not args.all_peers:
        # SAM ViT-H takes minutes per image on a few CPU cores: ViT-B alone is the CPU reference
        peers = [e for e in peers if e.name != "sam_vit_h"]
    return entries + peers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cuda, cpu (default: cuda if available)")
    parser.add_argument("--models", nargs="+", help=f"samlight configs (default: {' '.join(SAMLIGHT_MODELS)})")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "int8"],
                        help="default: fp32 and bf16 (on CPU bf16 only where oneDNN supports it); int8: CPU "
                             "only, samlight models' linears as int8 GEMMs, the rest bf16")
    parser.add_argument("--mode", nargs="+", choices=["eager", "compile", "graph"], help="samlight execution modes")
    parser.add_argument("--repeats", type=int, help="timed repetitions (default: 100 on CUDA, 5 on CPU)")
    parser.add_argument("--batch", type=int, help="throughput batch (default 32 on CUDA, 0 = skip on CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads (e.g. 2 to match a 2-core machine)")
    parser.add_argument("--no-peers", action="store_true", help="measure only samlight models")
    parser.add_argument("--all-peers", action="store_true", help="include SAM ViT-H on CPU too (very slow)")
    parser.add_argument("--no-prompt", action="store_true", help="skip the prompt-to-mask (decoder) measurement")
    parser.add_argument("--json", default=None, help="where to write the JSON (default bench/results/bench-<device>-<date>.json)")


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (100 if device.type == "cuda" else 5)
    batch = args.batch if args.batch is not None else (32 if device.type == "cuda" else 0)
    results = []
    for entry in entries_for(args, device):
        log.info("measuring %s %s %s", entry.name, entry.precision, entry.mode)
        peer_repeats = repeats if entry.family == "samlight" else max(3, repeats // 5)
        try:
            results.append(measure(entry, device, peer_repeats, batch))
        except Exception as error:  # one model failing must not lose the others' numbers
            log.exception("%s failed", entry.name)
            results.append(Result(entry.name, entry.family, entry.precision, entry.mode, 0.0, error=str(error)[:300]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if not args.no_prompt:
        for result in results:
            # the predictor picks its own precision (bf16 on CUDA): measure once per model
            if result.family == "samlight" and result.mode == "eager" and result.error is None \
                    and result.precision == results[0].precision:
                result.prompt_to_mask_ms, result.prompt_to_mask_host_ms = measure_prompt_to_mask(
                    result.name, device, repeats)
    add_ratios(results)
    print(f"device: {device_description(device)}; torch {torch.__version__}; random weights; "
          f"input: each model's own (SAM-style models 1024x1024)")
    print(format_table(results))
    for r in results:
        if r.prompt_to_mask_ms is not None:
            print(f"{r.name} {r.precision}: box prompt -> mask (640x480, cached embedding): "
                  f"{r.prompt_to_mask_ms:.3f} ms on the device, {r.prompt_to_mask_host_ms:.3f} ms with the copy to host")
    stamp = dt.datetime.now(dt.timezone.utc)
    slug = device_description(device).split(",")[0].replace(" ", "-").lower()
    path = Path(args.json or f"bench/results/bench-{slug}-{stamp:%Y%m%d-%H%M%S}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "kind": "samlight-bench",
        "date": stamp.isoformat(),
        "device": device_description(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.node(),
        "repeats": repeats,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 0
