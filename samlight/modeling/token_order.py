"""How a 2D token grid is laid out as the 1D sequence that dilated attention segments.

``rowmajor`` is the plain raster order. ``morton`` is the Z-order curve: an aligned run of
4**k tokens is a 2**k x 2**k square tile, and keeping every 4**k-th token of a run is a 2D
subsampling with stride 2**k. Dilated segments therefore become square tiles and strided
sub-grids instead of thin strips of rows.
"""

from __future__ import annotations

import functools

import torch

TOKEN_ORDERS = ("rowmajor", "morton")


def _morton_code(y: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    code = torch.zeros_like(x)
    for bit in range(bits):
        code |= ((x >> bit) & 1) << (2 * bit)
        code |= ((y >> bit) & 1) << (2 * bit + 1)
    return code


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _sequence_index_cpu(order: str, height: int, width: int) -> torch.Tensor:
    """Raster index of the token at each sequence position."""
    n = height * width
    if order == "rowmajor":
        return torch.arange(n)
    if order != "morton":
        raise ValueError(f"unknown token order {order!r}; expected one of {TOKEN_ORDERS}")
    if height != width or height & (height - 1):
        raise ValueError(f"morton token order needs a square power-of-two grid, got {height}x{width}")
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    codes = _morton_code(ys.flatten(), xs.flatten(), max(height.bit_length() - 1, 0))
    # sequence position p holds raster token order[p]
    return torch.argsort(codes)


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _grid_index_cpu(order: str, height: int, width: int) -> torch.Tensor:
    """Sequence position of each raster token (inverse permutation)."""
    return torch.argsort(_sequence_index_cpu(order, height, width))


@functools.lru_cache(maxsize=64)
def _index_on(kind: str, order: str, height: int, width: int, device: str) -> torch.Tensor:
    # cached per device so that the hot path does no host-to-device copy
    make = _sequence_index_cpu if kind == "sequence" else _grid_index_cpu
    # cached tensors outlive the call: never let them become inference tensors (training reuses them)
    with torch.inference_mode(False):
        return make(order, height, width).to(device)


def sequence_index(order: str, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Raster index of the token at each sequence position (a permutation of H*W)."""
    return _index_on("sequence", order, height, width, str(device))


def grid_to_sequence(x: torch.Tensor, order: str) -> torch.Tensor:
    """(B, H, W, C) -> (B, H*W, C) in the given order."""
    b, h, w, c = x.shape
    flat = x.reshape(b, h * w, c)
    if order == "rowmajor":
        return flat
    return flat.index_select(1, sequence_index(order, h, w, x.device))


def sequence_to_grid(x: torch.Tensor, order: str, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`grid_to_sequence`: (B, H*W, C) -> (B, H, W, C)."""
    b, n, c = x.shape
    if order != "rowmajor":
        x = x.index_select(1, _index_on("grid", order, height, width, str(x.device)))
    return x.reshape(b, height, width, c)
