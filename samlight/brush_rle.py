"""Label Studio brush RLE, computed where the mask is (on the GPU for a served click).

The bytes are the same as ``label_studio_sdk.converter.brush.mask2rle`` (tested byte for byte); the sdk builds
a Python string bit by bit, about a second for a noisy 640×480 mask. Here every step is a tensor operation,
so on the GPU only the finished bytes cross to the host (a 307 KB mask becomes ~0.1–120 KB of RLE).

Format (thi.ng rle-pack): 32-bit value count, 5-bit word size - 1, four 4-bit run-length field sizes - 1,
then per run: 1 bit repeat flag, 2 bits field-size index, the run length - 1, the 8-bit value. The mask is
written as RGBA (each pixel value four times), as Label Studio's brush expects.
"""

from __future__ import annotations

import numpy as np
import torch

RLE_SIZES = (3, 4, 8, 16)  # the sdk's and Label Studio's defaults
WORD = 8
MAX_RUN = 1 << 16


def mask_to_rle_bytes(mask: torch.Tensor | np.ndarray) -> bytes:
    """A 2-D mask (bool, or uint8 0/255) -> Label Studio brush RLE bytes, computed on the mask's device."""
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D, got shape {tuple(mask.shape)}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"mask must be bool or uint8, got {mask.dtype}")
    flat = mask.flatten()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8) * 255
    lengths, values = runs(flat)
    # RGBA: every pixel value is written four times, so every run is four times as long
    return encode_runs(lengths * 4, values, flat.numel() * 4).cpu().numpy().tobytes()


def mask_to_rle(mask: torch.Tensor | np.ndarray) -> list[int]:
    """``mask_to_rle_bytes`` as the list of numbers Label Studio's JSON holds (the sdk's ``mask2rle``)."""
    return list(mask_to_rle_bytes(mask))


def encode_values(flat: torch.Tensor | np.ndarray) -> list[int]:
    """The sdk's ``encode_rle(flat)`` for uint8 values with the default sizes."""
    flat = torch.as_tensor(flat).flatten().long()
    lengths, values = runs(flat)
    return list(encode_runs(lengths, values, flat.numel()).cpu().numpy().tobytes())


def runs(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths and values (int64) of the runs of equal values in a 1-D tensor."""
    if flat.numel() == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=flat.device)
        return empty, empty
    last = torch.tensor([flat.numel() - 1], device=flat.device)
    ends = torch.cat([torch.nonzero(flat[1:] != flat[:-1]).flatten(), last])
    lengths = torch.diff(ends, prepend=torch.tensor([-1], device=flat.device))
    return lengths, flat[ends].long()


def encode_runs(lengths: torch.Tensor, run_values: torch.Tensor, total: int) -> torch.Tensor:
    """RLE bytes (uint8 tensor) of ``total`` values given as runs of equal values, default sizes."""
    device = lengths.device
    # runs longer than 256 use the 16-bit field: full 65536-chunks first, then the remainder
    long_run = lengths > 256
    full_chunks = torch.where(long_run, (lengths - 1) // MAX_RUN, 0)
    pieces = full_chunks + 1
    piece_count = int(pieces.sum()) if lengths.numel() else 0
    if piece_count != lengths.numel():
        index_in_run = torch.arange(piece_count, device=device) - torch.repeat_interleave(
            torch.cumsum(pieces, 0) - pieces, pieces, output_size=piece_count)
        is_last = index_in_run == torch.repeat_interleave(full_chunks, pieces, output_size=piece_count)
        remainder = torch.repeat_interleave(lengths - full_chunks * MAX_RUN, pieces, output_size=piece_count)
        lengths = torch.where(is_last, remainder, MAX_RUN)
        run_values = torch.repeat_interleave(run_values, pieces, output_size=piece_count)
        long_run = torch.repeat_interleave(long_run, pieces, output_size=piece_count)

    size_index = torch.where(lengths <= 8, 0, torch.where(lengths <= 16, 1, torch.where(lengths <= 256, 2, 3)))
    size_index = torch.where(long_run, 3, size_index)
    # a run of one is a literal block of one value (flag 0, index 0, 3-bit length 0); the tail of a long
    # run stays a repeat even when it is one value long
    single = (lengths == 1) & ~long_run
    flag = (~single).long()
    size_index = torch.where(single, 0, size_index)
    length_width = torch.tensor(RLE_SIZES, device=device)[size_index]
    code = (((flag << 2 | size_index) << length_width | (lengths - 1)) << WORD) | run_values

    header_values = torch.tensor([total, WORD - 1, *(s - 1 for s in RLE_SIZES)], device=device)
    header_widths = torch.tensor([32, 5, 4, 4, 4, 4], device=device)
    return pack_fields(torch.cat([header_values, code]), torch.cat([header_widths, 3 + length_width + WORD]))


def pack_fields(values: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Concatenate each value's low ``width`` bits (most significant first, widths <= 32) and pad with 1-8 zero
    bits to whole bytes, as the sdk does (a whole zero byte when already aligned)."""
    total_bits = int(widths.sum())
    offsets = torch.cumsum(widths, 0) - widths
    word, start = offsets // 32, offsets % 32
    end = start + widths  # a field ends at most 31 bits into the next 32-bit word
    spill = (end - 32).clamp(min=0)
    values = values & ((1 << widths) - 1)
    high = (values << (32 - end).clamp(min=0)) >> spill  # the part in its first word
    low = (values & ((1 << spill) - 1)) << (32 - spill)  # what spills into the next one (0 when nothing)
    count = total_bits // 32 + 2
    # fields never share a bit, so adding their parts ORs them
    words = torch.zeros(count, dtype=torch.int64, device=values.device)
    words.index_add_(0, word, high).index_add_(0, word + 1, low)
    shifts = torch.tensor([24, 16, 8, 0], device=values.device)
    data = ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).flatten()
    return data[: total_bits // 8 + 1]
