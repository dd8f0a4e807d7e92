"""Weight-only quantization of float matrices, in the layouts PyTorch's CPU kernels read.

Every function works on a matrix ``[out, in]`` or a stack of them ``[..., out, in]`` (a layer's routed
experts), so that a stacked expert tensor is quantized in one call and each expert's slice stays a
contiguous view the kernels read in place. Scales are rounded to the model dtype *before* the weights
are rounded, so that :func:`dequantize` gives exactly the values the kernels multiply by.

- int8: symmetric, one scale per output channel (``_weight_int8pack_mm``).
- int4: asymmetric, one scale and one zero point per group of input channels per output channel, with
  ``w = (q - 8) * scale + zero`` (``_weight_int4pack_mm_for_cpu``), packed two values a byte in that
  kernel's blocked layout, which depends on the CPU (see :class:`Int4Layout`).
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import torch

INT4_ROW_MULTIPLE = 16  # the int4 kernel wants the output channels in whole 16-row tiles


class Int4Layout(NamedTuple):
    """How the CPU int4 kernel lays out a weight: output channels in blocks of ``block_rows``, input by input.

    PyTorch's packing follows the vector width it was dispatched to (blocks of 64 rows with AVX-512, 32
    with AVX2). In a whole block with ``halves``, byte ``(k, j)`` holds row ``j`` (low nibble) and row
    ``j + block_rows / 2`` (high nibble) of input ``k``; a last, shorter block, and every block without
    ``halves``, holds rows ``2j`` and ``2j + 1``. The bytes are only right for a machine of the same
    layout: a saved checkpoint records its layout, and loading repacks where this machine's differs.
    """

    block_rows: int
    halves: bool

    @property
    def name(self) -> str:
        return f"{self.block_rows}-{'halves' if self.halves else 'pairs'}"

    @classmethod
    def named(cls, name: str) -> "Int4Layout":
        for layout in INT4_LAYOUTS:
            if layout.name == name:
                return layout
        raise ValueError(f"unknown int4 layout {name!r}; known: {', '.join(layout.name for layout in INT4_LAYOUTS)}")


INT4_LAYOUTS = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False), Int4Layout(16, False))
# What checkpoints saved before layouts were recorded hold: this module then always packed AVX2's way.
UNRECORDED_INT4_LAYOUT = Int4Layout(32, True)


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


def pack_int4(levels: torch.Tensor, layout: Int4Layout | None = None) -> torch.Tensor:
    """Pack 4-bit levels [..., out, in] (0..15) two a byte in ``layout`` (this machine's by default).

    Written here, not left to ``_convert_weight_to_int4pack_for_cpu``, because that op takes one int32
    matrix at a time and only this machine's layout; :func:`machine_int4_layout` checks the two agree.
    """
    layout = layout or machine_int4_layout()
    *lead, rows, columns = levels.shape
    block, full = layout.block_rows, rows // layout.block_rows * layout.block_rows
    blocks = levels[..., :full, :].reshape(*lead, full // block, block, columns)
    if layout.halves:
        low, high = blocks.transpose(-1, -2).chunk(2, dim=-1)  # [..., blocks, in, block / 2] each
        parts = [(low | high << 4).reshape(*lead, -1)]
    else:
        parts = [_pack_pairs(blocks).reshape(*lead, -1)]
    if rows > full:
        parts.append(_pack_pairs(levels[..., full:, :]))
    return torch.cat(parts, dim=-1).reshape(*lead, rows, columns // 2)


def _pack_pairs(rows: torch.Tensor) -> torch.Tensor:
    """Rows [..., n, in] as bytes [..., in * n / 2], input by input, rows ``2j`` and ``2j + 1`` in byte ``j``."""
    pairs = rows.transpose(-1, -2).unflatten(-1, (-1, 2))
    return (pairs[..., 0] | pairs[..., 1] << 4).flatten(-2)


def unpack_int4(packed: torch.Tensor, layout: Int4Layout | None = None) -> torch.Tensor:
    """The 4-bit levels [..., out, in] of a :func:`pack_int4` result in ``layout`` (this machine's by default)."""
    layout = layout or machine_int4_layout()
    *lead, rows, half = packed.shape
    columns = 2 * half
    flat = packed.reshape(*lead, -1)
    block, full = layout.block_rows, rows // layout.block_rows * layout.block_rows
    blocks = flat[..., : full * half].reshape(*lead, full // block, columns, block // 2)
    if layout.halves:
        parts = [torch.cat((blocks & 15, blocks >> 4), dim=-1).transpose(-1, -2).reshape(*lead, full, columns)]
    else:
        parts = [_unpack_pairs(blocks).reshape(*lead, full, columns)]
    if rows > full:
        parts.append(_unpack_pairs(flat[..., full * half :].reshape(*lead, columns, -1)))
    return torch.cat(parts, dim=-2)


def _unpack_pairs(pairs: torch.Tensor) -> torch.Tensor:
    """Bytes [..., in, n / 2] of :func:`_pack_pairs` -> rows [..., n, in]."""
    return torch.stack((pairs & 15, pairs >> 4), dim=-1).flatten(-2).transpose(-1, -2)


def repack_int4(packed: torch.Tensor, stored: Int4Layout) -> torch.Tensor:
    """``packed`` (in ``stored`` layout) in this machine's layout."""
    machine = machine_int4_layout()
    return packed if stored == machine else pack_int4(unpack_int4(packed, stored), machine)


@cache
def machine_int4_layout() -> Int4Layout:
    """The layout this machine's int4 kernel reads, found by packing a probe matrix with PyTorch's own op."""
    rows = 2 * 64 + 48  # whole blocks and a short last one, in every layout
    levels = torch.randint(0, 16, (rows, 4), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    expected = torch._convert_weight_to_int4pack_for_cpu(levels, 1)
    for layout in INT4_LAYOUTS:
        if torch.equal(pack_int4(levels.to(torch.uint8), layout), expected):
            return layout
    raise RuntimeError(
        f"this PyTorch ({torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}) packs "
        "int4 weights in a layout deepseek_vl2 does not know: int4 cannot run here; use int8"
    )


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The matrix [..., out, in] that a quantized ``weight`` with ``scale`` stands for, rounded once to ``dtype``.

    An int8 level times a 16-bit scale is exact in float32, and PyTorch multiplies 16-bit floats in
    float32, so multiplying in the scale's own dtype rounds once, as rounding the float32 product would,
    without a float32 copy of the matrix. int4's ``(level - 8) * scale + zero`` is computed in float32,
    in place, with each group's scale and zero broadcast over the group (not repeated into matrices).
    """
    if bits == 8 and scale.dtype == dtype:
        return weight.to(dtype).mul_(scale.unsqueeze(-1))  # the levels are exact in 16 bits
    if bits == 8:
        return weight.float().mul_(scale.float().unsqueeze(-1)).to(dtype)
    levels = unpack_int4(weight)
    *lead, rows, columns = levels.shape
    groups = scale.shape[-3]
    scale, zero = scale.float().transpose(-3, -2).unsqueeze(-2).unbind(-1)  # [..., out, groups, 1] each
    values = levels.view(*lead, rows, groups, columns // groups).float().sub_(8).mul_(scale).add_(zero)
    return values.view(*lead, rows, columns).to(dtype)


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
