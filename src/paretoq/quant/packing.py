"""Dense bit packing of integer weight codes into uint8 buffers (pure functions, vectorised torch).

A quantized weight is stored as integer codes ``0 .. n_levels-1`` (``Scheme.to_codes``), one per
weight, flattened in row-major order of the (out_features, in_features) matrix. This module turns
such a code tensor into a 1-D ``torch.uint8`` tensor and back. Every format packs a fixed *chunk*
of codes into a fixed number of bytes; the tail of the last chunk is padded with zero codes, so
``packed.numel() == ceil(numel / codes_per_chunk) * bytes_per_chunk`` (:func:`packed_numel`).

Bit formats (``pack_codes`` / ``unpack_codes``), little-endian: code i of a chunk occupies bits
``bits*i .. bits*i + bits-1`` of the chunk, read as a little-endian integer (byte 0 holds the
lowest bits, so code 0 sits in the lowest bits of byte 0).

====  =====================  ================================================================
bits  chunk                  worked example
====  =====================  ================================================================
1     8 codes → 1 byte       codes [1,0,1,1,0,0,0,1] → 0b10001101 = 0x8D
2     4 codes → 1 byte       codes [1,2,3,0]         → 0b00111001 = 0x39
3     8 codes → 3 bytes      codes [1,2,3,4,5,6,7,0] → 24-bit 0b000_111_110_101_100_011_010_001
                                                       = 0x1F58D1 → bytes [0xD1, 0x58, 0x1F]
4     2 codes → 1 byte       codes [3,12]            → 0xC3 (code 0 in the low nibble)
====  =====================  ================================================================

Base-3 format for ternary codes 0..2 (``pack_ternary_base3`` / ``unpack_ternary_base3``): 5 codes
per byte, byte = Σ code[i]·3^i (code 0 is the least significant base-3 digit; max 242), i.e.
1.6 bits per weight instead of 2. Worked byte: codes [2,0,1,1,2] → 2 + 0·3 + 1·9 + 1·27 + 2·81
= 200 = 0xC8.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

BIT_WIDTHS = (1, 2, 3, 4, 8)  # 8: one code per byte (8-bit embedding tables)
TERNARY_CODES_PER_BYTE = 5
_POW3 = (1, 3, 9, 27, 81)


def chunk_layout(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) of the ``bits``-bit format: the smallest whole-byte chunk."""
    if bits not in BIT_WIDTHS:
        raise ValueError(f"bits must be one of {BIT_WIDTHS}, got {bits!r}")
    chunk_bits = math.lcm(8, bits)
    return chunk_bits // bits, chunk_bits // 8


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that ``pack_codes`` writes for ``numel`` codes of ``bits`` bits (tail padded)."""
    codes, nbytes = chunk_layout(bits)
    return -(-numel // codes) * nbytes


def packed_numel_base3(numel: int) -> int:
    """Bytes that ``pack_ternary_base3`` writes for ``numel`` ternary codes."""
    return -(-numel // TERNARY_CODES_PER_BYTE)


def _flat_padded(codes: torch.Tensor, per_chunk: int, max_code: int) -> torch.Tensor:
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be a uint8 tensor, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) > max_code:
        raise ValueError(f"codes must lie in 0..{max_code}, found {int(flat.max())}")
    pad = (-flat.numel()) % per_chunk
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.reshape(-1, per_chunk)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (any shape, values < 2**bits) into a 1-D uint8 tensor (layout: module doc)."""
    per_chunk, nbytes = chunk_layout(bits)
    chunks = _flat_padded(codes, per_chunk, (1 << bits) - 1).to(torch.int32)
    shifts = torch.arange(per_chunk, dtype=torch.int32, device=codes.device) * bits
    value = (chunks << shifts).sum(dim=1, dtype=torch.int32)  # ≤ 24 bits: fits int32
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=codes.device) * 8
    return ((value.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, as a 1-D uint8 tensor."""
    per_chunk, nbytes = chunk_layout(bits)
    expected = packed_numel(numel, bits)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"packed {bits}-bit buffer for {numel} codes must be {expected} uint8 bytes, "
                         f"got {packed.numel()} {packed.dtype}")
    chunks = packed.reshape(-1, nbytes).to(torch.int32)
    byte_shifts = torch.arange(nbytes, dtype=torch.int32, device=packed.device) * 8
    value = (chunks << byte_shifts).sum(dim=1, dtype=torch.int32)
    shifts = torch.arange(per_chunk, dtype=torch.int32, device=packed.device) * bits
    codes = (value.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return codes.to(torch.uint8).reshape(-1)[:numel]


def pack_ternary_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary uint8 codes (0, 1, 2; any shape) 5 per byte in base 3 (layout: module doc)."""
    chunks = _flat_padded(codes, TERNARY_CODES_PER_BYTE, 2).to(torch.int32)
    weights = torch.tensor(_POW3, dtype=torch.int32, device=codes.device)
    return (chunks * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_ternary_base3(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_base3`: the first ``numel`` codes, as a 1-D uint8 tensor."""
    expected = packed_numel_base3(numel)
    if packed.dtype != torch.uint8 or packed.numel() != expected:
        raise ValueError(f"packed base-3 buffer for {numel} codes must be {expected} uint8 bytes, "
                         f"got {packed.numel()} {packed.dtype}")
    weights = torch.tensor(_POW3, dtype=torch.int32, device=packed.device)
    codes = torch.div(packed.to(torch.int32).unsqueeze(1), weights, rounding_mode="floor") % 3
    return codes.to(torch.uint8).reshape(-1)[:numel]


@dataclass(frozen=True)
class CodeFormat:
    """One packed layout of a layer's codes: its name in ``quantization_config``, its functions."""

    name: str
    max_code: int  # codes 0..max_code fit
    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]  # (packed, numel) → codes
    nbytes: Callable[[int], int]  # numel → packed bytes


def _bit_format(bits: int) -> CodeFormat:
    return CodeFormat(f"{bits}bit", (1 << bits) - 1, functools.partial(pack_codes, bits=bits),
                      lambda packed, numel: unpack_codes(packed, bits, numel), functools.partial(packed_numel, bits=bits))


CODE_FORMATS: dict[str, CodeFormat] = {
    **{f.name: f for f in map(_bit_format, BIT_WIDTHS)},
    "base3": CodeFormat("base3", 2, pack_ternary_base3, unpack_ternary_base3, packed_numel_base3),
}
"""Every packed layout by name: "1bit", "2bit", "3bit", "4bit" (``pack_codes``) and "base3"."""
