"""The SAM-Lightening image encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from samlight.modeling.add_norm import add_layer_norm
from samlight.modeling.block import LighteningBlock
from samlight.modeling.configs import EncoderConfig
from samlight.modeling.token_order import grid_to_sequence, sequence_to_grid


class LighteningEncoder(nn.Module):
    """Patch 16 ViT with absolute position embedding, Dilated Flash Attention blocks and SAM's neck.

    Tokens are put in the config's sequence order once after the patch embedding and back into a grid
    once before the neck; every block works in sequence order (LayerNorm and MLP do not care, and
    dilated segments become contiguous runs).
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.img_size = config.img_size  # read by SAM's prompt pipeline
        grid = config.grid_size
        self.patch_embed = PatchEmbed(
            kernel_size=(config.patch_size, config.patch_size),
            stride=(config.patch_size, config.patch_size),
            embed_dim=config.embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            LighteningBlock(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                None if i in config.global_attn_indexes else config.dilated_branches,
                config.attention_backend,
            )
            for i in range(config.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dim, config.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(config.out_chans),
            nn.Conv2d(config.out_chans, config.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(config.out_chans),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding as one GEMM: (B, 3, H, W) -> (B, H/p, W/p, C).

        Same weights and result as ``self.patch_embed`` (a stride-p convolution), but cuDNN runs that
        convolution on a slow implicit-GEMM path in bf16 (140 us on an H100 vs ~15 us as a GEMM).
        """
        b, c, h, w = x.shape
        p = self.config.patch_size
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        proj = self.patch_embed.proj
        tokens = F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias)
        return tokens.view(b, h // p, w // p, proj.out_channels)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Neck output (B, 256, g, g) and every block's output as a (B, g, g, C) grid."""
        grid = self.config.grid_size
        order = self.config.token_order
        tokens = self.embed_patches(x) + self.pos_embed
        seq = grid_to_sequence(tokens, order)
        block_outputs = []
        for block in self.blocks:
            seq = block(seq)
            block_outputs.append(sequence_to_grid(seq, order, grid, grid))
        return self.apply_neck(block_outputs[-1]), block_outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.config.grid_size
        order = self.config.token_order
        seq = grid_to_sequence(self.embed_patches(x) + self.pos_embed, order)
        return self.apply_neck(sequence_to_grid(self.run_blocks(seq), order, grid, grid))

    def run_blocks(self, seq: torch.Tensor) -> torch.Tensor:
        """``for block in self.blocks: seq = block(seq)``, with every residual add fused into the LayerNorm
        that reads it (one kernel instead of two in CUDA inference; see ``add_norm``)."""
        blocks = list(self.blocks)
        normed = blocks[0].norm1(seq)
        for i, block in enumerate(blocks):
            seq, normed = add_layer_norm(seq, block.attn(normed), block.norm2)
            update = block.mlp(normed)
            if i + 1 < len(blocks):
                seq, normed = add_layer_norm(seq, update, blocks[i + 1].norm1)
            else:
                seq = seq + update
        return seq

    def apply_neck(self, grid: torch.Tensor) -> torch.Tensor:
        """``self.neck`` on a channels-last grid: (B, g, g, C) -> (B, 256, g, g), in channels-last memory.

        Same weights and math as ``self.neck(grid.permute(0, 3, 1, 2))``, but each of segment_anything's
        LayerNorm2d (nine elementwise kernels) is one ``F.layer_norm`` over the channel axis, and the 1x1
        convolution is a GEMM on the tokens: no NCHW copies.
        """
        conv1, norm1, conv3, norm2 = self.neck
        x = F.linear(grid, conv1.weight.flatten(1))
        x = F.layer_norm(x, (x.shape[-1],), norm1.weight, norm1.bias, norm1.eps)
        x = conv3(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # cuDNN/oneDNN keep channels-last memory
        x = F.layer_norm(x, (x.shape[-1],), norm2.weight, norm2.bias, norm2.eps)
        return x.permute(0, 3, 1, 2)
