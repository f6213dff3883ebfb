"""Prompt encoder + mask decoder as CUDA graphs, one per prompt signature.

The decoder is ~150 small kernels: launched one by one from Python they cost milliseconds of CPU time
for ~0.1 ms of GPU work. A click always has the same shapes for a given signature (number of prompts,
points per prompt, box or not, multimask or not, the previous mask or not), so each signature is captured
once and replayed.

In bf16 the mask decoder runs on its own bf16 copy of the weights: autocast inside a graph cannot cache
its casts, and re-casting every weight on every replay was a quarter of the decoder's GPU time.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

import torch
from segment_anything.modeling import PromptEncoder, Sam

Signature = tuple[int, int, bool, bool, bool]  # prompts, points per prompt (0 = none), box?, multimask?, mask?


def embed_prompts(prompt_encoder: PromptEncoder, coords, labels, boxes, masks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``PromptEncoder.forward`` for points, boxes and masks (K, 1, 256, 256), without its boolean-mask indexing.

    ``point_embedding[labels == -1] = ...`` needs the number of matches on the host (a sync), which a
    CUDA graph cannot capture; ``torch.where`` computes the same values on the device.
    """
    parts = []
    if coords is not None:
        points, point_labels = coords + 0.5, labels
        if boxes is None:  # SAM pads with a "not a point" when there is no box
            points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)
            point_labels = torch.cat([point_labels, -torch.ones_like(point_labels[:, :1])], dim=1)
        embedding = prompt_encoder.pe_layer.forward_with_coords(points, prompt_encoder.input_image_size)
        label = point_labels[..., None]
        embedding = torch.where(label == -1, prompt_encoder.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(label == 0, prompt_encoder.point_embeddings[0].weight, 0.0)
        embedding = embedding + torch.where(label == 1, prompt_encoder.point_embeddings[1].weight, 0.0)
        parts.append(embedding)
    if boxes is not None:
        parts.append(prompt_encoder._embed_boxes(boxes))
    sparse = torch.cat(parts, dim=1)
    if masks is not None:
        return sparse, prompt_encoder._embed_masks(masks)
    height, width = prompt_encoder.image_embedding_size
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, height, width)
    return sparse, dense


class GraphedPromptDecoder:
    def __init__(self, model: Sam, max_graphs: int = 16, autocast: bool = True) -> None:
        """``autocast``: run the mask decoder in bf16 (a copy of its weights, taken now: build a new
        decoder after changing the model's weights). Prompt coordinates are always encoded in float32."""
        self.model = model
        self.max_graphs = max_graphs
        self.dtype = torch.bfloat16 if autocast else torch.float32
        self.mask_decoder = copy.deepcopy(model.mask_decoder).to(self.dtype) if autocast else model.mask_decoder
        self._graphs: OrderedDict[Signature, tuple] = OrderedDict()
        self._lock = threading.Lock()

    def _decode(self, features, dense_pe, coords, labels, boxes, masks, multimask):
        sparse, dense = embed_prompts(self.model.prompt_encoder, coords, labels, boxes, masks)
        low_res, iou = self.mask_decoder(
            image_embeddings=features,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse.to(self.dtype),
            dense_prompt_embeddings=dense.to(self.dtype),
            multimask_output=multimask,
        )
        return low_res.float(), iou.float()

    def _capture(self, signature: Signature, features: torch.Tensor):
        prompts, points, has_box, multimask, has_mask = signature
        device = features.device
        # every tensor the graph reads from outside its own pool lives here, as long as the graph: the graph
        # holds raw addresses, and a freed input's memory would be handed to other tensors
        static = {
            "features": torch.zeros_like(features, dtype=self.dtype),
            # depends on the weights alone: computed once, outside the graph
            "dense_pe": self.model.prompt_encoder.get_dense_pe().to(self.dtype),
            "coords": torch.zeros(prompts, points, 2, device=device) if points else None,
            "labels": torch.ones(prompts, points, device=device, dtype=torch.int) if points else None,
            "boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]], device=device).repeat(prompts, 1) if has_box else None,
            "masks": torch.zeros(prompts, 1, *self.model.prompt_encoder.mask_input_size, device=device)
            if has_mask else None,
        }
        args = (static["features"], static["dense_pe"], static["coords"], static["labels"], static["boxes"],
                static["masks"], multimask)
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
    def __call__(self, features, coords, labels, boxes, multimask: bool,
                 masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (K, C, 256, 256) and predicted IoU (K, C), cloned out of the graph; ``masks``:
        the previous click's low-res logits (K, 1, 256, 256), SAM's mask input."""
        prompts = (coords if coords is not None else boxes).shape[0]
        signature = (prompts, 0 if coords is None else coords.shape[1], boxes is not None, multimask,
                     masks is not None)
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
            if masks is not None:
                static["masks"].copy_(masks)
            graph.replay()
            return low_res.clone(), iou.clone()
