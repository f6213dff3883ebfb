"""SAM's mask decoder for a click, with its attention computed through the projections' factors.

A click's decoder attends between a handful of prompt tokens (T = 7 for a point or a box) and 4096 image tokens.
SAM projects all 4096 image tokens (keys, values, or queries: 4096 × 256 × 128 multiply-adds each) before
attending. Folding the few tokens' side into the weights instead (per head, ``q·(Wk x) = (Wkᵀ q)·x``; a
softmax row sums to one, so ``Σ p (Wv x + b) = Wv (Σ p x) + b``; the key bias shifts every score of a row
equally and cancels) leaves products of the image tokens with 8·T vectors: 2.3× fewer multiply-adds per
attention. With the cached embedding, the first layer's image-side projections are the same for every click on
the image (no mask input): they are computed once per image (``image_context``) and reused.

The upscaling, two 2×2 stride-2 transposed convolutions, maps each pixel to its own 2×2 block: it runs as two
GEMMs whose outputs stay in that blocked order, and only the final masks (a few 256² maps, not 32 channels of
them) are gathered into image order. On two AVX2 CPU cores a box click's decoder takes about 22 ms instead of
SAM's 60 (``samlight bench --device cpu --threads 2``); the values are SAM's up to float rounding
(``tests/test_fast_paths.py``).
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from torch import nn

from samlight.graphed_decoder import ChannelsLastUpsample


def _heads(linear: nn.Linear, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A projection's weight as (heads, head dim, in) and its bias as (heads, head dim)."""
    out_features, in_features = linear.weight.shape
    return linear.weight.view(heads, out_features // heads, in_features), linear.bias.view(heads, -1)


def tokens_to_image(attention: nn.Module, q_tokens: torch.Tensor, k_image: torch.Tensor,
                    v_image: torch.Tensor) -> torch.Tensor:
    """SAM ``Attention(q=tokens, k=image, v=image)``: (K, T, C) tokens, (B, N, C) image tokens with B = 1 or K."""
    heads = attention.num_heads
    prompts, count, _ = q_tokens.shape
    wk, _ = _heads(attention.k_proj, heads)  # the key bias cancels in the softmax
    wv, bv = _heads(attention.v_proj, heads)
    q = attention.q_proj(q_tokens).view(prompts, count, heads, -1)
    folded = torch.einsum("kthd,hdc->kthc", q, wk).reshape(prompts, count * heads, -1) / math.sqrt(q.shape[-1])
    # (K, T·heads, N): the softmax runs over contiguous rows
    weights = torch.softmax(torch.matmul(folded, k_image.transpose(1, 2)), dim=-1)
    mixed = torch.matmul(weights, v_image).view(prompts, count, heads, -1)  # (K, T, heads, C)
    out = torch.einsum("kthc,hdc->kthd", mixed, wv) + bv
    return attention.out_proj(out.reshape(prompts, count, -1))


def image_to_tokens(attention: nn.Module, q_image: torch.Tensor, k_tokens: torch.Tensor, v_tokens: torch.Tensor,
                    projected_q: torch.Tensor | None = None) -> torch.Tensor:
    """SAM ``Attention(q=image, k=tokens, v=tokens)`` -> (K, N, C); ``projected_q``: ``q_proj(q_image)`` of the
    one image as (heads, head dim, N), if the caller has it (then the scores cost next to nothing)."""
    heads = attention.num_heads
    prompts, count, _ = k_tokens.shape
    k = attention.k_proj(k_tokens).view(prompts, count, heads, -1)
    v = attention.v_proj(v_tokens).view(prompts, count, heads, -1)
    scale = 1 / math.sqrt(k.shape[-1])
    if projected_q is None:
        wq, bq = _heads(attention.q_proj, heads)
        folded = torch.einsum("kthd,hdc->khtc", k, wq).reshape(prompts, heads * count, -1)
        shift = torch.einsum("kthd,hd->kht", k, bq).reshape(prompts, heads * count, 1)
        scores = (torch.matmul(folded, q_image.transpose(1, 2)) + shift) * scale  # (K, heads·T, N)
    else:
        scores = torch.matmul(k.transpose(1, 2), projected_q) * scale  # (K, heads, T, N)
    pixels = scores.shape[-1]
    # softmax over each head's T tokens: a reduction across rows, each row contiguous over the image
    weights = torch.softmax(scores.view(prompts, heads, count, pixels), dim=2).view(prompts, heads * count, pixels)
    wo = attention.out_proj.weight.view(attention.out_proj.out_features, heads, -1)  # (C, heads, d)
    values = torch.einsum("kthd,chd->khtc", v, wo).reshape(prompts, heads * count, -1)
    return torch.matmul(weights.transpose(1, 2), values) + attention.out_proj.bias


@dataclass
class ImageContext:
    """What every click on an image without a mask input shares: the image tokens as the decoder's first layer
    sees them, and that layer's projections of them."""

    keys: torch.Tensor  # (1, N, C): embedding + the no-mask embedding
    k0: torch.Tensor  # (heads, d, N): first layer, tokens-to-image keys
    v0: torch.Tensor  # (heads, N, d): its values
    q0: torch.Tensor  # (heads, d, N): first layer, image-to-tokens queries


class FactoredMaskDecoder(nn.Module):
    """Prompt embeddings -> SAM's low-res masks and predicted IoUs, for a few prompts on one image (a click, a
    few rectangles); ``sam``'s weights (the upscaling's copied in GEMM form: build a new decoder after changing
    them), float32. Keeps the contexts of the last ``images`` images."""

    def __init__(self, sam: Sam, images: int = 4) -> None:
        super().__init__()
        self.decoder = sam.mask_decoder
        self.prompt_encoder = sam.prompt_encoder
        up1, self.norm2d, self.act1, up2, self.act2 = self.decoder.output_upscaling
        self.up1, self.up2 = ChannelsLastUpsample(up1), ChannelsLastUpsample(up2)
        with torch.no_grad():
            self.register_buffer("pos", self.prompt_encoder.get_dense_pe().flatten(2).transpose(1, 2).clone())
        self.images = images
        self._order: torch.Tensor | None = None
        self._contexts: OrderedDict[int, tuple[weakref.ref, ImageContext]] = OrderedDict()
        self._lock = threading.Lock()

    @torch.inference_mode()
    def image_context(self, features: torch.Tensor) -> ImageContext:
        """The context of an embedding (1, C, H, W), computed on its first click and kept while the embedding
        lives (the last few images)."""
        with self._lock:
            kept = self._contexts.get(id(features))
            if kept is not None and kept[0]() is features:
                self._contexts.move_to_end(id(features))
                return kept[1]
        layer = self.decoder.transformer.layers[0]
        no_mask = self.prompt_encoder.no_mask_embed.weight.view(1, 1, -1)
        keys = features.flatten(2).transpose(1, 2) + no_mask
        with_pos = keys + self.pos
        to_image, to_tokens = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        context = ImageContext(keys, _by_head(to_image.k_proj(with_pos), to_image.num_heads),
                               _by_head(to_image.v_proj(keys), to_image.num_heads).transpose(1, 2).contiguous(),
                               _by_head(to_tokens.q_proj(with_pos), to_tokens.num_heads))
        with self._lock:
            self._contexts[id(features)] = (weakref.ref(features), context)
            while len(self._contexts) > self.images:
                self._contexts.popitem(last=False)
        return context

    @torch.inference_mode()
    def forward(self, features: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor | None,
                multimask_output: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``features`` (1, C, H, W); ``sparse`` (K, S, C) prompt embeddings; ``dense`` (K, C, H, W) mask-input
        embeddings or None (no mask input). Returns low-res logits (K, M, 4H, 4W) and IoUs (K, M)."""
        d = self.decoder
        transformer = d.transformer
        prompts = sparse.shape[0]
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(prompts, -1, -1), sparse), dim=1)
        context = self.image_context(features) if dense is None else None
        keys = context.keys if context else (features + dense).flatten(2).transpose(1, 2)
        queries = tokens
        for index, layer in enumerate(transformer.layers):
            if index == 0:  # SAM's first layer: no positional encoding, no residual in the self attention
                queries = layer.norm1(layer.self_attn(q=queries, k=queries, v=queries))
            else:
                q = queries + tokens
                queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
            first = index == 0 and context is not None
            keys_pos = None if first else keys + self.pos  # both cross attentions see the same image side
            if first:
                attn = _attend_projected(layer.cross_attn_token_to_image, queries + tokens, context.k0, context.v0)
            else:
                attn = tokens_to_image(layer.cross_attn_token_to_image, queries + tokens, keys_pos, keys)
            queries = layer.norm2(queries + attn)
            queries = layer.norm3(queries + layer.mlp(queries))
            attn = image_to_tokens(layer.cross_attn_image_to_token, keys_pos, queries + tokens, queries,
                                   context.q0 if first else None)
            keys = layer.norm4(keys + attn)
        attn = tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + self.pos, keys)
        hs = transformer.norm_final_attn(queries + attn)

        side = int(math.isqrt(keys.shape[1]))
        # the upscaling works pixel by pixel (each output pixel of a 2x2 stride-2 transposed convolution comes from
        # one input pixel): its outputs stay in the GEMMs' order, and only the masks are put in image order
        x = torch.addmm(self.up1.bias, keys.reshape(-1, keys.shape[-1]), self.up1.weight)
        x = x.view(-1, self.up1.out_channels)
        x = self.act1(F.layer_norm(x, (x.shape[-1],), self.norm2d.weight, self.norm2d.bias, self.norm2d.eps))
        x = self.act2(torch.addmm(self.up2.bias, x, self.up2.weight))  # (K·H·W·2·2, 2·2·C/8): blocked pixel order
        chosen = range(1, d.num_mask_tokens) if multimask_output else range(1)
        hyper = torch.stack([d.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in chosen], dim=1)
        blocked = torch.bmm(hyper, x.view(prompts, -1, hyper.shape[-1]).transpose(1, 2))  # (K, M, H·W·2·2·2·2)
        order = self._image_order(side, blocked.device).expand_as(blocked)
        masks = torch.take_along_dim(blocked, order, dim=-1)  # a gather: 10x faster than index_select here
        iou = d.iou_prediction_head(hs[:, 0])
        iou = iou[:, 1:] if multimask_output else iou[:, :1]
        return masks.view(prompts, len(chosen), 4 * side, 4 * side), iou

    def _image_order(self, side: int, device: torch.device) -> torch.Tensor:
        """For each low-res pixel in image order, its position in the blocked order (i, j, di1, dj1, di2, dj2)
        of the upscaling: row 4i + 2·di1 + di2, column 4j + 2·dj1 + dj2."""
        if self._order is None or self._order.device != device or self._order.numel() != 16 * side * side:
            blocked = torch.arange(16 * side * side, device=device).view(side, side, 2, 2, 2, 2)
            self._order = blocked.permute(0, 2, 4, 1, 3, 5).reshape(-1)
        return self._order


def _by_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(1, N, heads·d) projections of one image -> (heads, d, N)."""
    return x[0].view(x.shape[1], heads, -1).permute(1, 2, 0).contiguous()


def _attend_projected(attention: nn.Module, q_tokens: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM ``Attention(q=tokens, ...)`` whose keys (heads, d, N) and values (heads, N, d) are already projected."""
    heads = attention.num_heads
    prompts, count, _ = q_tokens.shape
    q = attention.q_proj(q_tokens).view(prompts, count, heads, -1).transpose(1, 2)  # (K, heads, T, d)
    weights = torch.softmax(torch.matmul(q, k) / math.sqrt(q.shape[-1]), dim=-1)  # (K, heads, T, N)
    out = torch.matmul(weights, v).transpose(1, 2)  # (K, T, heads, d)
    return attention.out_proj(out.reshape(prompts, count, -1))
