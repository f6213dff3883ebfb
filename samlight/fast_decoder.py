"""Prompt encoder + mask decoder as CUDA graphs, one per prompt signature.

The decoder is ~150 small kernels: launched one by one from Python they cost milliseconds of CPU time
for ~0.1 ms of GPU work. A click always has the same shapes for a given signature (number of prompts,
points per prompt, box or not, multimask or not), so each signature is captured once and replayed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from segment_anything.modeling import Sam

Signature = tuple[int, int, bool, bool]  # prompts, points per prompt (0 = none), box?, multimask?


class GraphedPromptDecoder:
    def __init__(self, model: Sam, max_graphs: int = 16, autocast: bool = True) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self.autocast = autocast
        self._graphs: OrderedDict[Signature, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def _decode(self, features, coords, labels, boxes, multimask):
        points = (coords, labels) if coords is not None else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=None)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=features,
                image_pe=self.model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low_res.float(), iou.float()

    def _capture(self, signature: Signature, features: torch.Tensor):
        prompts, points, has_box, multimask = signature
        device = features.device
        static = {
            "features": torch.zeros_like(features),
            "coords": torch.zeros(prompts, points, 2, device=device) if points else None,
            "labels": torch.ones(prompts, points, device=device, dtype=torch.int) if points else None,
            "boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=device).repeat(prompts, 1) if has_box else None,
        }
        args = (static["features"], static["coords"], static["labels"], static["boxes"], multimask)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._decode(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            outputs = self._decode(*args)
        return graph, static, outputs

    @torch.inference_mode()
    def __call__(self, features, coords, labels, boxes, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (K, C, 256, 256) and predicted IoU (K, C), cloned out of the graph."""
        prompts = (coords if coords is not None else boxes).shape[0]
        signature = (prompts, 0 if coords is None else coords.shape[1], boxes is not None, multimask)
        with self._lock:
            entry = self._graphs.get(signature)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.popitem(last=False)
                entry = self._graphs[signature] = self._capture(signature, features)
            self._graphs.move_to_end(signature)
            graph, static, (low_res, iou) = entry
            static["features"].copy_(features)
            if coords is not None:
                static["coords"].copy_(coords)
                static["labels"].copy_(labels)
            if boxes is not None:
                static["boxes"].copy_(boxes)
            graph.replay()
            return low_res.clone(), iou.clone()
