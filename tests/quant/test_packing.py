"""pack/unpack: exact round trips for every format, and one worked byte per format."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paretoq.quant.packing import (chunk_layout, pack_codes, pack_ternary_base3, packed_numel, packed_numel_base3,
                                   unpack_codes, unpack_ternary_base3)


def _u8(values):
    return torch.tensor(values, dtype=torch.uint8)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([1, 2, 3, 4]), data=st.data())
def test_pack_unpack_round_trip(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), min_size=0, max_size=101))
    codes = _u8(values)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_numel(len(values), bits)
    assert torch.equal(unpack_codes(packed, bits, len(values)), codes)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 2), min_size=0, max_size=101))
def test_base3_round_trip(values):
    codes = _u8(values)
    packed = pack_ternary_base3(codes)
    assert packed.numel() == packed_numel_base3(len(values)) == -(-len(values) // 5)
    assert torch.equal(unpack_ternary_base3(packed, len(values)), codes)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_round_trip_2d_odd_shape(bits):
    codes = torch.randint(0, 1 << bits, (33, 97), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.numel() == packed_numel(33 * 97, bits)
    assert packed.numel() * 8 / (33 * 97) < bits + 0.01  # dense: padding only in the last chunk
    assert torch.equal(unpack_codes(packed, bits, codes.numel()).reshape(33, 97), codes)


@pytest.mark.parametrize("bits, codes, expected", [
    (1, [1, 0, 1, 1, 0, 0, 0, 1], [0x8D]),
    (2, [1, 2, 3, 0], [0x39]),
    (3, [1, 2, 3, 4, 5, 6, 7, 0], [0xD1, 0x58, 0x1F]),
    (4, [3, 12], [0xC3]),
])
def test_worked_bytes(bits, codes, expected):
    """The worked examples of the module docstring (little-endian, code 0 in the lowest bits)."""
    assert pack_codes(_u8(codes), bits).tolist() == expected


def test_worked_byte_base3():
    assert pack_ternary_base3(_u8([2, 0, 1, 1, 2])).tolist() == [0xC8]
    assert pack_ternary_base3(_u8([2] * 5)).tolist() == [242]


def test_tail_is_zero_padded():
    assert pack_codes(_u8([3]), 2).tolist() == [3]
    assert pack_codes(_u8([7, 7, 7]), 3).tolist() == [0xFF, 0x01, 0x00]
    assert pack_ternary_base3(_u8([1, 2])).tolist() == [1 + 2 * 3]


def test_chunk_layouts():
    assert [chunk_layout(b) for b in (1, 2, 3, 4)] == [(8, 1), (4, 1), (8, 3), (2, 1)]


def test_bad_inputs():
    with pytest.raises(ValueError, match="0..3"):
        pack_codes(_u8([4]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(_u8([0]), 5)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="0..2"):
        pack_ternary_base3(_u8([3]))
    with pytest.raises(ValueError, match="must be 2 uint8 bytes"):
        unpack_codes(_u8([0]), 2, 5)
    with pytest.raises(ValueError, match="base-3"):
        unpack_ternary_base3(_u8([0]), 6)
