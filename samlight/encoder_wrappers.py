"""The image encoder as it runs in serving: bf16 weights and one CUDA graph per batch size; on the CPU,
optionally compiled (:class:`CompiledEncoder`).

Eager PyTorch spends more time launching the encoder's ~100 small kernels than running them at
batch 1. A CUDA graph captured once per batch size replays them with one launch. Shapes are fixed
(1024x1024 after SAM's padding), so the graphs stay valid; inputs are copied into a static buffer.
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import nn

log = logging.getLogger(__name__)


class GraphedEncoder(nn.Module):
    def __init__(self, encoder: nn.Module, dtype: torch.dtype = torch.bfloat16, max_graphs: int = 8) -> None:
        super().__init__()
        self.encoder = encoder.to(dtype).eval()
        self.dtype = dtype
        self.img_size = encoder.img_size
        self.max_graphs = max_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        # capture and replay share static buffers: one thread at a time
        self._lock = threading.Lock()

    def _capture(self, batch: int, device: torch.device):
        static_in = torch.zeros(batch, 3, self.img_size, self.img_size, device=device, dtype=self.dtype)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: kernel selection and autotuning happen outside the graph
                self.encoder(static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static_out = self.encoder(static_in)
        return graph, static_in, static_out

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.encoder(x.to(self.dtype)).float()
        batch = x.shape[0]
        with self._lock:
            if batch not in self._graphs:
                if len(self._graphs) >= self.max_graphs:
                    return self.encoder(x.to(self.dtype)).clone()
                self._graphs[batch] = self._capture(batch, x.device)
            graph, static_in, static_out = self._graphs[batch]
            static_in.copy_(x)
            graph.replay()
            # the next replay overwrites static_out
            return static_out.clone()


class CompiledEncoder(nn.Module):
    """``torch.compile`` of an encoder that falls back to the eager module when compilation fails.

    Compilation happens on the first call, for batch 1. Not every torch build compiles every CPU graph (torch 2.11
    cannot compile this encoder in bf16 on the AMX Xeon of our H100 host, for one): a server then keeps
    answering, eagerly and slower, instead of failing every request.
    """

    def __init__(self, encoder: nn.Module, backend: str | object = "inductor",
                 mode: str | None = "max-autotune-no-cudagraphs") -> None:
        super().__init__()
        self.encoder = encoder
        self.img_size = encoder.img_size
        self.compiled = torch.compile(encoder, backend=backend, mode=mode if backend == "inductor" else None)
        self.error: str | None = None  # why compilation failed, once it has

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one image at a time: one compiled shape (each new batch size would recompile for tens of seconds),
        # and a CPU gains nothing from batching the encoder
        if x.shape[0] == 1:
            return self._one(x)
        return torch.cat([self._one(image[None]) for image in x])

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        if self.error is None:
            try:
                return self.compiled(x)
            except torch._dynamo.exc.BackendCompilerFailed as error:
                inner = error.inner_exception
                self.error = f"{type(inner).__name__}: {str(inner).splitlines()[0] if str(inner) else ''}"
                log.warning("torch.compile of the encoder failed; running it eagerly: %s", self.error)
        return self.encoder(x)
