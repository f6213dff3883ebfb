"""``samlight bench``: image-encoder latency, peak memory and throughput, samlight next to its peers.

Every model runs with random weights (speed does not depend on them) at its own input size, in one run, and
every model gets the same treatment: each precision is timed eagerly and in the best mode that runs for it
(CUDA: a CUDA graph, or ``torch.compile`` where capture fails; CPU: ``torch.compile``). A model whose own code
breaks with bf16 weights runs bf16 under autocast instead (``bf16-amp``). The table keeps the eager time as a
column and says which mode the best time is; the ratio to the fastest peer compares each at its best. SAM
ViT-H runs eagerly only (unless ``--mode`` asks otherwise): in fp32 it is the reference of the paper's speed-up.
On CUDA, times are CUDA-event medians after warm-up; on CPU, wall-clock medians over fewer repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
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
from samlight.predictor import Predictor, encoder_dtype

log = logging.getLogger(__name__)

SAMLIGHT_MODELS = ("lightening_t", "lightening_s")
SAM_MODELS = ("vit_b", "vit_h")
MODES = ("eager", "graph", "compile")


@dataclass
class Entry:
    """One encoder in one precision."""

    name: str
    family: str  # "samlight" or "peer"
    precision: str  # fp32, bf16, int8 (CPU: int8 linears, the rest bf16 where native, else fp32)
    build: Callable[[], nn.Module]


@dataclass
class Result:
    name: str
    family: str
    precision: str  # bf16-amp: fp32 weights under bf16 autocast (the model's code breaks with bf16 weights)
    params_m: float
    input_size: int | None = None
    mode: str | None = None  # the mode of latency_ms: the fastest that ran
    latency_ms: float | None = None
    latency_spread_ms: float | None = None
    eager_ms: float | None = None
    graph_ms: float | None = None
    compile_ms: float | None = None
    peak_mb: float | None = None
    weights_mb: float | None = None
    throughput_batch: int | None = None
    throughput_img_s: float | None = None
    prompt_to_mask_ms: float | None = None  # the serving path, on the device (kernels only)
    prompt_to_mask_host_ms: float | None = None  # including the mask's copy to host memory
    prompt_to_mask_sam_ms: float | None = None  # SAM's prompt encoder and mask decoder as built, eager
    vs_sam_vit_h_fp32: float | None = None  # SAM ViT-H fp32 eager / best
    vs_fastest_peer: float | None = None  # the fastest peer at its best / best
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def _peer_entries(precisions: list[str]) -> list[Entry]:
    """SAM ViT-B/H from segment_anything plus any other light SAM that is installed."""
    entries = []
    for name in SAM_MODELS:
        for precision in precisions:
            entries.append(Entry(f"sam_{name}", "peer", precision,
                                 lambda n=name: ModelSpec.random(n).load().image_encoder))
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
    dtype = encoder_dtype(entry.precision)
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


def _runner(model: nn.Module, x: torch.Tensor, mode: str, amp: bool) -> Callable[[], object]:
    """A call of ``model`` on ``x`` in ``mode`` (warmed up; a graph captured), under bf16 autocast if ``amp``."""
    def precision():
        return torch.autocast(x.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def call(fn=model):
        with precision():
            return fn(x)

    if mode == "compile":
        compiled = torch.compile(model)
        call(compiled)  # compiles
        return lambda: call(compiled)
    if mode == "graph":
        if x.device.type != "cuda":
            raise ValueError("CUDA graphs need a GPU")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        return graph.replay
    return call


def modes_for(device: torch.device, requested: list[str] | None) -> list[str]:
    """What each model is timed in: the requested modes, or eager and the best that runs on the device."""
    if requested:
        return list(requested)
    return ["eager", "graph", "compile"] if device.type == "cuda" else ["eager", "compile"]


def measure(entry: Entry, device: torch.device, repeats: int, batch: int, modes: list[str],
            fallback_compile: bool = True) -> Result:
    """Time ``entry`` in each of ``modes``; with ``fallback_compile``, compile only where a graph failed."""
    model, dtype = _prepare(entry, device)
    params, weight_bytes = _weights(model)
    result = Result(entry.name, entry.family, entry.precision, params / 1e6, weights_mb=weight_bytes / 2**20)
    size = result.input_size = getattr(model, "img_size", 1024)
    warmup = 3 if device.type == "cuda" else 1
    amp = False
    runners: dict[str, Callable[[], object]] = {}
    with torch.inference_mode():
        x = torch.randn(1, 3, size, size, device=device, dtype=dtype)
        if dtype == torch.bfloat16 and entry.precision == "bf16":
            try:
                model(x)
            except RuntimeError as error:  # e.g. EfficientViT-SAM casts to float32 inside and expects autocast
                model, amp, result.precision = model.float(), True, "bf16-amp"
                result.notes.append(f"bf16 weights fail ({str(error)[:120]}); bf16 autocast instead")
        for mode in modes:
            if mode == "compile" and fallback_compile and "graph" in modes and result.graph_ms is not None:
                continue  # the graph already removes the launch overheads compile would
            try:
                run = _runner(model, x, mode, amp)
                times = time_ms(run, device, repeats, warmup)
            except Exception as error:  # noqa: BLE001 - a mode that does not run is reported, the others still are
                log.info("%s %s %s failed: %s", entry.name, entry.precision, mode, error)
                result.notes.append(f"{mode}: {str(error)[:160]}")
                _sync_quietly(device)
                continue
            median = statistics.median(times)
            setattr(result, f"{mode}_ms", median)
            runners[mode] = run
            if result.latency_ms is None or median < result.latency_ms:
                result.mode, result.latency_ms = mode, median
                result.latency_spread_ms = (max(times) - min(times)) if len(times) > 1 else 0.0
        if result.mode is None:
            raise RuntimeError("; ".join(result.notes) or "no mode ran")
        if device.type == "cuda":
            run = runners[result.mode]
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            run()
            torch.cuda.synchronize(device)
            result.peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        del runners, x
        if batch > 1:
            result.throughput_batch, result.throughput_img_s = _throughput(model, result.mode, amp, device, dtype,
                                                                           size, batch, max(2, repeats // 10))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _sync_quietly(device: torch.device) -> None:
    if device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def measure_prompt_to_mask(name: str, device: torch.device, repeats: int) -> tuple[float, float, float]:
    """Box prompt -> mask at 640x480 with the embedding cached: ms on the device and ms including the copy to
    host on the serving path (a CUDA graph on the GPU, the factored decoder on the CPU), and ms of SAM's own
    prompt encoder and mask decoder (eager, float32 on the CPU, bf16 autocast on CUDA as the predictor)."""
    import numpy as np

    predictor = Predictor(ModelSpec.random(name).load(), device=device)
    image = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    embedding = predictor.embed(image)
    box = np.array([[100.0, 80.0, 400.0, 360.0]])
    on_device = time_ms(torch.inference_mode()(lambda: predictor._decode(embedding, None, None, box, None, False)),
                        device, repeats, 3)
    to_host = time_ms(lambda: predictor.predict_embedding(embedding, box=box[0], multimask_output=False), device,
                      repeats, 3)
    model = predictor.model
    _, _, boxes = predictor._prompt_tensors(embedding, None, None, box)

    def sam_decoder():
        with torch.inference_mode():
            low_res, _ = predictor.sam_low_res(embedding.features, None, None, boxes, None, False)
            return model.postprocess_masks(low_res, embedding.input_size, embedding.original_size)

    reference = time_ms(sam_decoder, device, repeats, 3)
    return statistics.median(on_device), statistics.median(to_host), statistics.median(reference)


def _throughput(model, mode, amp, device, dtype, size, batch, repeats) -> tuple[int, float]:
    """Images/s at ``batch`` in ``mode``, halving the batch while it does not fit in memory."""
    while batch >= 1:
        try:
            x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
            times = time_ms(_runner(model, x, mode, amp), device, repeats, warmup=1)
            return batch, 1000 * batch / statistics.median(times)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    raise RuntimeError("does not fit in memory at batch 1")


def fastest_peer(results: list[Result]) -> Result | None:
    peers = [r for r in results if r.family == "peer" and r.latency_ms]
    return min(peers, key=lambda r: r.latency_ms) if peers else None


def add_ratios(results: list[Result]) -> None:
    """Speed-ups of each best time over SAM ViT-H fp32 eager (the paper's reference) and, for samlight, over the
    fastest peer at its best."""
    ok = [r for r in results if r.latency_ms]
    reference = next((r.eager_ms for r in ok if r.name == "sam_vit_h" and r.precision == "fp32"), None)
    best_peer = fastest_peer(results)
    for r in ok:
        if reference:
            r.vs_sam_vit_h_fp32 = reference / r.latency_ms
        if best_peer is not None and r.family == "samlight":
            r.vs_fastest_peer = best_peer.latency_ms / r.latency_ms


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: list[Result]) -> str:
    header = (f"{'model':<22}{'prec':<9}{'input':>6}{'params M':>9}{'eager ms':>10}{'best ms':>10}  {'(mode)':<10}"
              f"{'peak MB':>8}{'img/s (b)':>15}{'x ViT-H fp32':>13}{'x best peer':>12}")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<22}{r.precision:<9}  error: {r.error}")
            continue
        tput = "-" if r.throughput_img_s is None else f"{r.throughput_img_s:.1f} ({r.throughput_batch})"
        lines.append(
            f"{r.name:<22}{r.precision:<9}{_fmt(r.input_size, 'd'):>6}{r.params_m:>9.1f}"
            f"{_fmt(r.eager_ms, '.3f'):>10}{_fmt(r.latency_ms, '.3f'):>10}  {'(' + (r.mode or '-') + ')':<10}"
            f"{_fmt(r.peak_mb, '.0f'):>8}{tput:>15}{_fmt(r.vs_sam_vit_h_fp32, '.1f'):>13}"
            f"{_fmt(r.vs_fastest_peer, '.1f'):>12}"
        )
    best_peer = fastest_peer(results)
    if best_peer is not None:
        lines.append(f"fastest peer at its best: {best_peer.name} {best_peer.precision} ({best_peer.mode}) "
                     f"{best_peer.latency_ms:.3f} ms; x ViT-H fp32: SAM ViT-H fp32 eager / best ms")
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def entries_for(args: argparse.Namespace, device: torch.device) -> list[Entry]:
    cpu_bf16 = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    precisions = args.precision or (["fp32", "bf16"] if device.type == "cuda" or cpu_bf16 else ["fp32"])
    entries = [
        Entry(name, "samlight", p, lambda n=name: ModelSpec.random(n).load().image_encoder)
        for name in args.models or SAMLIGHT_MODELS for p in precisions
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
    parser.add_argument("--mode", nargs="+", choices=list(MODES),
                        help="execution modes for every model (default: eager and the best that runs: a CUDA graph, "
                             "else torch.compile, on CUDA; torch.compile on the CPU)")
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
    modes = modes_for(device, args.mode)
    results = []
    for entry in entries_for(args, device):
        log.info("measuring %s %s", entry.name, entry.precision)
        peer_repeats = repeats if entry.family == "samlight" else max(3, repeats // 5)
        # SAM ViT-H is the paper's fp32-eager reference (and compiling it takes minutes): eager unless asked
        entry_modes = ["eager"] if entry.name == "sam_vit_h" and not args.mode else modes
        try:
            results.append(measure(entry, device, peer_repeats, batch, entry_modes, fallback_compile=not args.mode))
        except Exception as error:  # one model failing must not lose the others' numbers
            log.exception("%s failed", entry.name)
            results.append(Result(entry.name, entry.family, entry.precision, 0.0, error=str(error)[:300]))
            _sync_quietly(device)
    if not args.no_prompt:
        measured = set()
        for result in results:
            # the predictor picks its own precision (bf16 on CUDA): measure once per model
            if result.family == "samlight" and result.error is None and result.name not in measured:
                measured.add(result.name)
                (result.prompt_to_mask_ms, result.prompt_to_mask_host_ms,
                 result.prompt_to_mask_sam_ms) = measure_prompt_to_mask(result.name, device, repeats)
    add_ratios(results)
    print(f"device: {device_description(device)}; torch {torch.__version__}; random weights; "
          f"input: each model's own (SAM-style models 1024x1024); modes tried: {', '.join(modes)}")
    print(format_table(results))
    for r in results:
        if r.prompt_to_mask_ms is not None:
            print(f"{r.name}: box prompt -> mask (640x480, cached embedding): {r.prompt_to_mask_ms:.3f} ms on the "
                  f"device, {r.prompt_to_mask_host_ms:.3f} ms with the copy to host; SAM's decoder as built: "
                  f"{r.prompt_to_mask_sam_ms:.3f} ms")
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
        "modes": modes,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return 0
