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
import math
import threading
from collections import OrderedDict

import torch
from segment_anything.modeling import PromptEncoder, Sam
from torch import nn
from torch.nn import functional as F

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


class ReducedAttention(nn.Module):
    """SAM's ``Attention`` between a few prompt tokens and thousands of image tokens, as broadcast products and
    sums: inductor turns each into one fused reduction over the large side, where fused-attention kernels pad
    the 7-token side to 64-row tiles and spend most of their time on padding. Same weights, same values."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.out_proj = attention.out_proj
        self.num_heads = attention.num_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A side of batch 1 (the image tokens, the same for every prompt) broadcasts against the other."""
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        heads = self.num_heads
        channels = q.shape[-1]
        q = q.view(q.shape[0], q.shape[1], 1, heads, channels // heads)
        k = k.view(k.shape[0], 1, k.shape[1], heads, channels // heads)
        v = v.view(v.shape[0], 1, v.shape[1], heads, channels // heads)
        scores = (q * k).sum(-1, dtype=torch.float32) / math.sqrt(channels // heads)  # (B, Nq, Nk, heads)
        weights = torch.softmax(scores, dim=2).to(v.dtype)
        out = (weights[..., None] * v).sum(2)  # (B, Nq, heads, head dim)
        return self.out_proj(out.reshape(out.shape[0], out.shape[1], channels))


class ChannelsLastUpsample(nn.Module):
    """``ConvTranspose2d(kernel_size=2, stride=2)`` on channels-last maps (B, H, W, C): one GEMM over the pixels
    (each output pixel takes exactly one input pixel) and an interleave that moves whole channel vectors."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        if conv.kernel_size != (2, 2) or conv.stride != (2, 2) or conv.padding != (0, 0) or conv.groups != 1:
            raise ValueError(f"not a 2×2 stride-2 transposed convolution: {conv}")
        self.out_channels = conv.out_channels
        # (Cin, Cout, 2, 2) -> (Cin, 2·2·Cout): the GEMM writes each input pixel's 2×2 outputs channel-last
        weight = conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.in_channels, -1)
        bias = conv.bias.detach() if conv.bias is not None else conv.weight.new_zeros(conv.out_channels)
        self.register_buffer("weight", weight.clone())
        self.register_buffer("bias", bias.repeat(4).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        y = torch.addmm(self.bias, x.reshape(-1, channels), self.weight)
        y = y.view(batch, height, width, 2, 2, self.out_channels).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(batch, 2 * height, 2 * width, self.out_channels)


class ChannelsLastMaskDecoder(nn.Module):
    """SAM's ``MaskDecoder`` with the upscaling kept channels-last: the transformer already returns the image
    tokens as (B, H·W, C), SAM turns them to NCHW for two transposed convolutions and a ``LayerNorm2d`` (a
    strided reduction over channels); here those are GEMMs, a plain ``layer_norm`` over the last dimension and
    the hypernetwork product over contiguous channels. Same weights, same values (up to rounding)."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        up1, self.norm2d, self.act1, up2, self.act2 = decoder.output_upscaling
        self.up1, self.up2 = ChannelsLastUpsample(up1), ChannelsLastUpsample(up2)

    def forward(self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                multimask_output: bool, shared_image: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``shared_image``: every prompt has the same dense embedding (no mask input, as in a point grid); the
        image tokens then enter the transformer once, not once per prompt, and the first layer's projections of
        them are computed once (with ``ReducedAttention``, which broadcasts), until the first image-to-token
        update makes them differ."""
        d = self.decoder
        prompts = sparse_prompt_embeddings.size(0)
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse_prompt_embeddings), dim=1)
        if shared_image:
            src, pos_src = image_embeddings + dense_prompt_embeddings[:1], image_pe
        else:
            src = torch.repeat_interleave(image_embeddings, prompts, dim=0) + dense_prompt_embeddings
            pos_src = torch.repeat_interleave(image_pe, prompts, dim=0)
        _, channels, height, width = src.shape
        hs, keys = d.transformer(src, pos_src, tokens)
        batch = keys.shape[0]
        x = self.up1(keys.view(batch, height, width, channels))
        norm = self.norm2d  # LayerNorm2d over channels: a layer norm over the last dimension here
        x = self.act1(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps))
        x = self.act2(self.up2(x))  # (B, 4H, 4W, C/8)
        hyper_in = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=2)
        masks = torch.bmm(x.view(batch, -1, x.shape[-1]), hyper_in).transpose(1, 2)
        masks = masks.reshape(batch, -1, 4 * height, 4 * width)
        iou_pred = d.iou_prediction_head(hs[:, 0])
        chosen = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, chosen], iou_pred[:, chosen]


def bulk_mask_decoder(mask_decoder: nn.Module) -> ChannelsLastMaskDecoder:
    """A copy of SAM's mask decoder for many prompts on one image: cross attention as ``ReducedAttention``
    (which broadcasts the shared image tokens), upscaling channels-last."""
    decoder = copy.deepcopy(mask_decoder)
    transformer = decoder.transformer
    for layer in transformer.layers:
        layer.cross_attn_token_to_image = ReducedAttention(layer.cross_attn_token_to_image)
        layer.cross_attn_image_to_token = ReducedAttention(layer.cross_attn_image_to_token)
    transformer.final_attn_token_to_image = ReducedAttention(transformer.final_attn_token_to_image)
    return ChannelsLastMaskDecoder(decoder)


class CompiledBulkDecoder:
    """Prompt encoder + mask decoder for large batches of point prompts (automatic masks' grid), compiled,
    with SAM's stability score.

    With hundreds of prompts the decoder is bandwidth-bound, not launch-bound: each prompt carries its own
    copy of the image tokens (4096 × 256) and of the upscaled mask features (32 × 256 × 256). Eager PyTorch
    runs SAM's broadcasts (``keys + key_pe``), ``LayerNorm2d`` and GELUs over them as separate strided
    kernels (most of a grid's time on an H200); inductor fuses them. The decoder is ``bulk_mask_decoder``'s: the
    image tokens enter the transformer once for all prompts. One compiled graph per batch shape (batches are
    padded to a power of two), in ``dtype`` (bf16 on CUDA) on its own copy of the weights.
    """

    # inductor's coordinate-descent tuning of its GPU kernels' block sizes: 44.5 instead of 54.4 ms per 32×32
    # grid on an H200, for about 55 instead of 17 s of compilation, once per process (bench/bulk_decoder_check.py)
    OPTIONS = {"coordinate_descent_tuning": True}

    def __init__(self, model: Sam, dtype: torch.dtype = torch.bfloat16, options: dict | None = None) -> None:
        """``options``: inductor's, for this compilation (default ``OPTIONS``)."""
        self.model = model
        self.dtype = dtype
        self.mask_decoder = bulk_mask_decoder(model.mask_decoder).to(dtype)
        on_cuda = next(model.parameters()).is_cuda
        self._compiled = torch.compile(self._decode, dynamic=False,
                                       options=(self.OPTIONS if on_cuda else {}) if options is None else options)
        self._lock = threading.Lock()

    def _decode(self, features, dense_pe, coords, labels, offset: float):
        sparse, dense = embed_prompts(self.model.prompt_encoder, coords, labels, None)
        low_res, iou = self.mask_decoder(image_embeddings=features, image_pe=dense_pe,
                                         sparse_prompt_embeddings=sparse.to(self.dtype),
                                         dense_prompt_embeddings=dense.to(self.dtype), multimask_output=True,
                                         shared_image=True)
        # SAM's stability score, fused into the pass that writes the logits (no second read of them)
        threshold = self.model.mask_threshold
        inside = (low_res > threshold + offset).flatten(2).sum(-1, dtype=torch.int32)
        outside = (low_res > threshold - offset).flatten(2).sum(-1, dtype=torch.int32)
        return low_res, iou.float(), inside / outside.clamp(min=1)

    @torch.inference_mode()
    def __call__(self, features, coords, labels, offset: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K one-or-more-point prompts' three masks: low-res logits (K, 3, 256, 256) in bf16, predicted IoU and
        stability score (K, 3)."""
        dense_pe = self.model.prompt_encoder.get_dense_pe().to(self.dtype)
        count = coords.shape[0]
        padded = 1 << (count - 1).bit_length()  # a few batch shapes, each compiled once: pad to a power of two
        pad = lambda t: torch.cat([t, t[-1:].expand(padded - count, *t.shape[1:])])  # noqa: E731
        with self._lock:  # compilation is not thread-safe
            low_res, iou, stability = self._compiled(features.to(self.dtype), dense_pe, pad(coords), pad(labels),
                                                     offset)
        return low_res[:count], iou[:count], stability[:count]
