"""Label Studio brush RLE, computed where the mask is (on the GPU for a served click).

The bytes are the same as ``label_studio_sdk.converter.brush.mask2rle`` (tested byte for byte); the sdk builds
a Python string bit by bit, about a second for a noisy 640×480 mask. Here every step is a tensor operation,
so on the GPU only the finished bytes cross to the host (a 307 KB mask becomes ~0.1–120 KB of RLE).

Format (thi.ng rle-pack): 32-bit value count, 5-bit word size - 1, four 4-bit run-length field sizes - 1,
then per run: 1 bit repeat flag, 2 bits field-size index, the run length - 1, the 8-bit value. The mask is
written as RGBA (each pixel value four times), as Label Studio's brush expects.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

RLE_SIZES = (3, 4, 8, 16)  # the sdk's and Label Studio's defaults
WORD = 8
MAX_RUN = 1 << 16
HEADER_WIDTHS = (32, 5, 4, 4, 4, 4)  # value count, word size - 1, the four field sizes - 1


def mask_to_rle_bytes(mask: torch.Tensor | np.ndarray) -> bytes:
    """A 2-D mask (bool, or uint8 0/255) -> Label Studio brush RLE bytes, computed on the mask's device."""
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
    lengths, values = runs(mask.flatten())
    if mask.dtype == torch.bool:
        values = values * 255
    # RGBA: every pixel value is written four times, so every run is four times as long
    return encode_runs(lengths * 4, values, mask.numel() * 4).cpu().numpy().tobytes()


def mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """``mask_to_rle_bytes`` as the list of numbers Label Studio's JSON holds (the sdk's ``mask2rle``)."""
    return list(mask_to_rle_bytes(mask))


def encode_values(flat: torch.Tensor | np.ndarray) -> list[int]:
    """The sdk's ``encode_rle(flat)`` for uint8 values with the default sizes."""
    flat = torch.as_tensor(flat).flatten()
    lengths, values = runs(flat)
    return list(encode_runs(lengths, values, flat.numel()).cpu().numpy().tobytes())


def runs(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths and values (int64) of the runs of equal values in a 1-D tensor."""
    if flat.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return empty, empty
    ends = torch.cat([torch.nonzero(flat[1:] != flat[:-1]).flatten(), flat.new_full((1,), flat.numel() - 1,
                                                                                  dtype=torch.int64)])
    lengths = torch.diff(ends, prepend=ends.new_full((1,), -1))
    return lengths, flat[ends].long()


@functools.lru_cache(maxsize=None)
def _field_widths(device: torch.device) -> torch.Tensor:
    return torch.tensor(RLE_SIZES, device=device)


def encode_runs(lengths: torch.Tensor, run_values: torch.Tensor, total: int) -> torch.Tensor:
    """RLE bytes (uint8 tensor) of ``total`` values given as runs of equal values, default sizes.

    One host sync (two counts) besides the caller's: on the GPU every sync waits for the queue to drain.
    """
    device = lengths.device
    long_run = lengths > 256  # the 16-bit field, in full 65536-chunks first, then the remainder
    size_index = (lengths > 8).long() + (lengths > 16) + long_run  # field sizes 3, 4, 8, 16 bits
    length_width = _field_widths(device)[size_index]
    full_chunks = torch.div(lengths - 1, MAX_RUN, rounding_mode="floor") * long_run
    run_bits = (full_chunks + 1) * (3 + length_width + WORD)  # every piece of a long run is 27 bits
    extra_pieces, code_bits = torch.stack([full_chunks.sum(), run_bits.sum()]).tolist() if lengths.numel() else (0, 0)
    piece_count = lengths.numel() + extra_pieces
    if piece_count != lengths.numel():
        pieces = full_chunks + 1
        split = functools.partial(torch.repeat_interleave, repeats=pieces, output_size=piece_count)
        index_in_run = torch.arange(piece_count, device=device) - split(torch.cumsum(pieces, 0) - pieces)
        is_last = index_in_run == split(full_chunks)
        lengths = torch.where(is_last, split(lengths - full_chunks * MAX_RUN), MAX_RUN)
        run_values, long_run, size_index, length_width = (split(t) for t in (run_values, long_run, size_index,
                                                                             length_width))

    # a run of one is a literal block of one value (flag 0, index 0, 3-bit length 0); the tail of a long
    # run stays a repeat even when it is one value long
    flag = ((lengths != 1) | long_run).long()
    code = (((flag << 2 | size_index) << length_width | (lengths - 1)) << WORD) | run_values

    header_values = torch.tensor([total, WORD - 1, *(s - 1 for s in RLE_SIZES)], device=device)
    header_widths = torch.tensor(HEADER_WIDTHS, device=device)
    return pack_fields(torch.cat([header_values, code]), torch.cat([header_widths, 3 + length_width + WORD]),
                       total_bits=sum(HEADER_WIDTHS) + int(code_bits))


def pack_fields(values: torch.Tensor, widths: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Concatenate each value's low ``width`` bits (most significant first, widths <= 32; ``total_bits`` their
    sum) and pad with 1-8 zero bits to whole bytes, as the sdk does (a whole zero byte when already aligned)."""
    offsets = torch.cumsum(widths, 0) - widths
    word, start = offsets // 32, offsets % 32
    end = start + widths  # a field ends at most 31 bits into the next 32-bit word
    spill = (end - 32).clamp(min=0)
    values = values & ((1 << widths) - 1)
    high = (values << (32 - end).clamp(min=0)) >> spill  # the part in its first word
    low = (values & ((1 << spill) - 1)) << (32 - spill)  # what spills into the next one (0 when nothing)
    # fields never share a bit, so adding their parts ORs them
    words = torch.zeros(total_bits // 32 + 2, dtype=torch.int64, device=values.device)
    words.index_add_(0, word, high).index_add_(0, word + 1, low)
    data = (torch.stack([words >> 24, words >> 16, words >> 8, words], dim=1) & 0xFF).to(torch.uint8)  # big-endian
    return data.flatten()[: total_bits // 8 + 1]
