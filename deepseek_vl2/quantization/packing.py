"""Weight-only quantization of float matrices, in the layouts PyTorch's CPU kernels read.

Every function works on a matrix ``[out, in]`` or a stack of them ``[..., out, in]`` (a layer's routed
experts), so that a stacked expert tensor is quantized in one call and each expert's slice stays a
contiguous view the kernels read in place. Scales are rounded to the model dtype *before* the weights
are rounded, so that :func:`dequantize` gives exactly the values the kernels multiply by.

- int8: symmetric, one scale per output channel (``_weight_int8pack_mm``).
- int4: asymmetric, one scale and one zero point per group of input channels per output channel, with
  ``w = (q - 8) * scale + zero`` (``_weight_int4pack_mm_for_cpu``), packed two values a byte in that
  kernel's blocked layout (see :func:`pack_int4`).
"""

from __future__ import annotations

import torch

INT4_ROW_BLOCK = 32  # the CPU int4 kernel's output-channel tile: two 16-row halves share each byte
INT4_ROW_MULTIPLE = 16  # its packing wants the output channels in whole 16-row tiles (the tail tile is 16 rows)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values [..., out, in], scales [..., out] in ``weight``'s dtype)."""
    values = weight.float()
    scale = (values.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
    quantized = (values / scale.float().unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)  # one float copy
    return quantized, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [..., out, in / 2], scales and zeros [..., in / group_size, out, 2] in ``weight``'s dtype)."""
    *lead, rows, columns = weight.shape
    groups = weight.float().reshape(*lead, rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
    zero = (low + 8 * scale.float()).to(weight.dtype)
    levels = (groups - zero.float().unsqueeze(-1)).div_(scale.float().unsqueeze(-1)).add_(8)  # one float copy
    quantized = levels.round_().clamp_(0, 15).to(torch.uint8).reshape(*lead, rows, columns)
    scales_and_zeros = torch.stack((scale, zero), dim=-1).transpose(-3, -2).contiguous()
    return pack_int4(quantized), scales_and_zeros


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit levels [..., out, in] (0..15) as ``_convert_weight_to_int4pack_for_cpu`` does, two a byte.

    Per tile of 32 output channels, byte ``(k, j)`` holds channel ``j`` (low nibble) and ``16 + j`` (high
    nibble) of input ``k``; a last tile of 16 channels holds channels ``2j`` and ``2j + 1``. Written here
    (it is checked against the op in the tests) because the op takes one int32 matrix at a time.
    """
    *lead, rows, columns = levels.shape
    full = rows // INT4_ROW_BLOCK * INT4_ROW_BLOCK
    tiles = levels[..., :full, :].reshape(*lead, full // INT4_ROW_BLOCK, 2, 16, columns).transpose(-1, -2)
    parts = [(tiles[..., 0, :, :] | tiles[..., 1, :, :] << 4).reshape(*lead, -1)]
    if rows > full:
        tail = levels[..., full:, :].transpose(-1, -2).reshape(*lead, columns, 8, 2)
        parts.append((tail[..., 0] | tail[..., 1] << 4).reshape(*lead, -1))
    return torch.cat(parts, dim=-1).reshape(*lead, rows, columns // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit levels [..., out, in] of a :func:`pack_int4` result."""
    *lead, rows, half = packed.shape
    columns = 2 * half
    flat = packed.reshape(*lead, -1)
    full = rows // INT4_ROW_BLOCK * INT4_ROW_BLOCK
    tiles = flat[..., : full * half].reshape(*lead, full // INT4_ROW_BLOCK, columns, 16)
    parts = [torch.stack((tiles & 15, tiles >> 4), dim=-3).transpose(-1, -2).reshape(*lead, full, columns)]
    if rows > full:
        tail = flat[..., full * half :].reshape(*lead, columns, 8)
        parts.append(torch.stack((tail & 15, tail >> 4), dim=-1).reshape(*lead, columns, 16).transpose(-1, -2))
    return torch.cat(parts, dim=-2)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 matrix [..., out, in] that a quantized ``weight`` with ``scale`` stands for."""
    if bits == 8:
        return weight.float() * scale.float().unsqueeze(-1)
    levels = unpack_int4(weight).float()
    group_size = levels.shape[-1] // scale.shape[-3]
    scale, zero = scale.float().transpose(-3, -2).repeat_interleave(group_size, dim=-2).unbind(-1)
    return (levels - 8) * scale + zero


def quantize(weight: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, scale) of ``weight`` [..., out, in] with ``bits`` 8 or 4.

    A stack is quantized one matrix at a time into its outputs, so that the float32 temporaries are one
    matrix's, not a whole layer of experts'.
    """
    one = quantize_int8 if bits == 8 else lambda matrix: quantize_int4(matrix, group_size)
    if weight.dim() == 2:
        return one(weight)
    quantized, scale = empty_quantized(weight.shape, bits, group_size, weight.dtype, weight.device)
    for index in range(weight.shape[0]):
        quantized[index], scale[index] = quantize(weight[index], bits, group_size)
    return quantized, scale


def empty_quantized(shape, bits: int, group_size: int | None, dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """Uninitialised (weight, scale) tensors as :func:`quantize` returns them for a weight of ``shape``."""
    *lead, rows, columns = shape
    if bits == 8:
        return (
            torch.empty(shape, dtype=torch.int8, device=device),
            torch.empty(*lead, rows, dtype=dtype, device=device),
        )
    return (
        torch.empty(*lead, rows, columns // 2, dtype=torch.uint8, device=device),
        torch.empty(*lead, columns // group_size, rows, 2, dtype=dtype, device=device),
    )


def int4_shape_problem(shape, group_size: int) -> str | None:
    """Why the int4 kernel cannot take a weight of ``shape`` [..., out, in], or None where it can."""
    rows, columns = shape[-2:]
    if columns % group_size:
        return f"its {columns} input channels are not a multiple of group_size {group_size}"
    if rows % INT4_ROW_MULTIPLE:
        return f"its {rows} output channels are not a multiple of {INT4_ROW_MULTIPLE} (the int4 kernel's tile)"
    return None
