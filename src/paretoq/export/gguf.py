"""GGUF export for llama.cpp: ParetoQ weights written as GGML block types that hold their levels exactly.

Every ParetoQ level set is an integer grid, levels = step · k with small integers k:

==========  ======  ===============  ===========================================
bits        step    k                GGML types that hold k (block, bits/weight)
==========  ======  ===============  ===========================================
1           1       −1, +1           Q1_0 (128, 1.125), Q2_0 (64, 2.25), TQ2_0 (256, 2.06), TQ1_0 (256, 1.69),
                                     Q2_K, Q3_K, Q4_0
1.58        2/3     −1, 0, +1        Q2_0, TQ2_0, TQ1_0, Q2_K (256, 2.63), Q3_K, Q4_0
2           1/4     −3, −1, +1, +3   Q2_K (d·(2q − 3)), Q4_0 (32, 4.5)
3           1       −4 … 3           Q3_K (256, 3.44), Q4_0
4           1       −8 … 7           Q4_0
==========  ======  ===============  ===========================================

A GGML block stores one fp16 scale d per block of 32 (Q4_0), 64 (Q2_0), 128 (Q1_0) or 256 (the others) weights and the
integers k. When our scale α̃ = max(α, 1e-5) is constant over each block — per-row scales with
in_features a multiple of the block, or group_size a multiple of it — d = fp16(α̃ · step) and the
block decodes to d · k = Ŵ up to the rounding of the scale to fp16 (relative error ≤ 2⁻¹¹, the
same for every weight of the block). Layers whose scales change inside a block are refused
(``UserError``), or written as F16 Ŵ with ``fallback="f16"``. docs/gguf.md has the full table.

Block layouts (ggml's, as ``gguf.quants`` decodes them; within a block, element e):

- Q4_0 (32 → 18 B): d | 16 B, byte j = u[j] | u[j + 16] << 4 with u = k + 8.
- Q1_0 (128 → 18 B, ggml type 41): d | 16 B of sign bits, element e at bit e % 8 of byte e // 8, 1 for +d, 0 for −d.
- Q2_0 (64 → 18 B, ggml type 42; gguf-py 0.19 lacks it, so its layout is written here from llama.cpp's
  block_q2_0 / dequantize_row_q2_0): d | 16 B of 2-bit fields u = k + 1, element e at bits 2·(e % 4) of byte
  e // 4; value d·(u − 1) ∈ {−d, 0, d, 2d}.
- TQ2_0 (256 → 66 B): 64 B of 2-bit fields u = k + 1 (e = 128a + 32s + j sits in byte 32a + j at
  bit 2s — the "crumb" layout below) | d.
- TQ1_0 (256 → 54 B): u = k + 1 as base-3 digits, 5 per byte (elements 0–159: e = 32i + j in byte j;
  160–239: e = 160 + 16i + j in byte 32 + j), then 4 per byte (240–255: e = 240 + 4i + j in byte
  48 + j), digit i weighted 3^(4 − i); each byte holds ⌈v · 256 / 243⌉ | d.
- Q2_K (256 → 84 B): 16 sub-block bytes sc | m << 4 | 64 B crumbs of q ∈ 0..3 | d | dmin; value
  d·sc·q − dmin·m. With dmin = d, sc and m chosen so that k = sc·q − m, the value is d·k.
- Q3_K (256 → 110 B): 32 B high bits (e = 32b + j: byte j, bit b) | 64 B crumbs of the low two bits |
  12 B of sixteen 6-bit sub-scales | d; value d·(sc − 32)·(u − 4), u the 3-bit field. With every
  sc = 33 the value is d·k, u = k + 4.

Architectures: Llama (llama.cpp "llama") and MiniCPM 1–4 dense ("minicpm": embedding_scale = scale_emb,
residual_scale = scale_depth/√L, logit_scale = hidden_size/dim_model_base, LongRoPE factors as the
``rope_factors_long`` / ``rope_factors_short`` tensors). llama.cpp rotates adjacent pairs (its "normal"
RoPE) where transformers rotates half-split pairs, so the rows of q_proj and k_proj are permuted per
head; a row permutation moves whole rows with their scales, so it keeps every block exact.

Tokenizer (tokenizer.json): byte-level BPE becomes llama.cpp's "gpt2" vocabulary (tokens, types, merges)
with a pre-tokenizer name read off the tokenizer.json (``gpt-2``, ``smollm``) or given; SentencePiece-style
BPE (byte_fallback, '▁' for spaces: MiniCPM, Llama 2) becomes the "llama" vocabulary, each token scored by
minus the rank of the merge that makes it, which reproduces the BPE merge order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from paretoq.errors import UserError
from paretoq.files import atomic_file
from paretoq.export.integers import LayerIntegers, layer_integers
from paretoq.quant.functional import GGUF_ACTIVATION_BLOCKS

logger = logging.getLogger(__name__)

FLOAT_TYPES = ("f16", "f32", "bf16", "q8_0")
FALLBACKS = ("refuse", "f16")
ARCHITECTURES = {"llama": "llama", "minicpm": "minicpm"}  # transformers model_type → llama.cpp arch


# --------------------------------------------------------------------------------------------------
# Block encoders: integers k (n_blocks, block) and one fp16 scale per block → ggml's bytes
# --------------------------------------------------------------------------------------------------

def _f16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _crumbs(u: np.ndarray) -> np.ndarray:
    """(n, 256) 2-bit values → (n, 64) bytes: element 128a + 32s + j goes to byte 32a + j, bits 2s."""
    u = u.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)).reshape(-1, 64)


def _encode_q4_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    u = (k + 8).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), u[:, :16] | (u[:, 16:] << 4)], axis=1)


def _encode_tq2_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    return np.concatenate([_crumbs(k + 1), _f16_bytes(d)], axis=1)


def _base3(digits: np.ndarray) -> np.ndarray:
    """(n, i, m) base-3 digits → (n, m) bytes: Σ_i digit_i · 3^(4 − i), stored as ⌈v · 256 / 243⌉."""
    weights = 3 ** (4 - np.arange(digits.shape[1], dtype=np.int32))
    v = (digits.astype(np.int32) * weights[None, :, None]).sum(axis=1)
    return ((v * 256 + 242) // 243).astype(np.uint8)


def _encode_tq1_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    u = (k + 1).astype(np.uint8)
    n = u.shape[0]
    return np.concatenate([_base3(u[:, :160].reshape(n, 5, 32)), _base3(u[:, 160:240].reshape(n, 5, 16)),
                           _base3(u[:, 240:].reshape(n, 4, 4)), _f16_bytes(d)], axis=1)


def _q2_k_affine(grid: tuple[int, ...]) -> tuple[int, int] | None:
    """(sc, m) with every k = sc·q − m for some q ∈ 0..3, sc ≤ 15, m ≤ 15; None if there is none."""
    m = -min(grid)
    sc = math.gcd(*(k + m for k in grid)) or 1
    if not (0 <= m <= 15 and sc <= 15 and max(grid) + m <= 3 * sc):
        return None
    return sc, m


def _encode_q2_k(k: np.ndarray, d: np.ndarray, grid) -> np.ndarray:
    sc, m = _q2_k_affine(grid)
    n = k.shape[0]
    scales = np.full((n, 16), sc | (m << 4), dtype=np.uint8)
    q = (k + m) // sc
    return np.concatenate([scales, _crumbs(q), _f16_bytes(d), _f16_bytes(d)], axis=1)


def _q3_k_scale_bytes(sub_scales: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit sub-scales → 12 bytes: low nibbles of i and i + 8 in byte i (i < 8), the high
    two bits of i, i + 4, i + 8, i + 12 in byte 8 + i (i < 4) at bits 0, 2, 4, 6."""
    low, high = sub_scales & 0xF, sub_scales >> 4
    return np.concatenate([low[:8] | (low[8:] << 4),
                           high[0:4] | (high[4:8] << 2) | (high[8:12] << 4) | (high[12:16] << 6)]).astype(np.uint8)


_Q3_K_UNIT_SCALES = _q3_k_scale_bytes(np.full(16, 33, dtype=np.uint8))  # sc − 32 = 1 in every sub-block


def _encode_q3_k(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    u = (k + 4).astype(np.uint8)
    n = u.shape[0]
    high = (u >> 2).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]
    hmask = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([hmask, _crumbs(u & 3), np.broadcast_to(_Q3_K_UNIT_SCALES, (n, 12)), _f16_bytes(d)], axis=1)


def _encode_q1_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    """Q1_0 (128 → 18 B): d | 16 B of sign bits, element e in byte e // 8 at bit e % 8, set for +d, clear for −d."""
    bits = (k > 0).astype(np.uint8).reshape(-1, 16, 8) << np.arange(8, dtype=np.uint8)
    return np.concatenate([_f16_bytes(d), np.bitwise_or.reduce(bits, axis=2)], axis=1)


def _encode_q2_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    """Q2_0 (64 → 18 B): d | 16 B of 2-bit fields u = k + 1 (value d·(u − 1) ∈ {−d, 0, d, 2d}), element e in
    byte e // 4 at bits 2·(e % 4)."""
    u = (k + 1).astype(np.uint8).reshape(-1, 16, 4) << (2 * np.arange(4, dtype=np.uint8))
    return np.concatenate([_f16_bytes(d), np.bitwise_or.reduce(u, axis=2)], axis=1)


@dataclass(frozen=True)
class BlockType:
    """A GGML type that stores d · k per block: which integer sets k it holds and how it packs them."""

    name: str
    type_id: int  # ggml's enum ggml_type
    block: int
    type_size: int  # bytes per block
    holds: Callable[[tuple[int, ...]], bool]
    encode: Callable[[np.ndarray, np.ndarray, tuple[int, ...]], np.ndarray]

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    @property
    def activation_block(self) -> int:
        """The block llama.cpp rounds this type's activations in (Q8_K: 256 for the K/TQ types, else Q8_0: 32)."""
        return GGUF_ACTIVATION_BLOCKS["Q8_K" if self.name.startswith("TQ") or self.name.endswith("_K") else "Q8_0"]

    @property
    def qtype(self):
        """gguf-py's GGMLQuantizationType member, or the bare type id where gguf-py has none (Q2_0 in 0.19)."""
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            return self.type_id


def _within(lo: int, hi: int) -> Callable[[tuple[int, ...]], bool]:
    return lambda grid: lo <= min(grid) and max(grid) <= hi


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q1_0", 41, 128, 18, lambda grid: set(grid) <= {-1, 1}, _encode_q1_0),
    BlockType("Q2_0", 42, 64, 18, _within(-1, 2), _encode_q2_0),
    BlockType("TQ2_0", 35, 256, 66, _within(-1, 1), _encode_tq2_0),
    BlockType("TQ1_0", 34, 256, 54, _within(-1, 1), _encode_tq1_0),
    BlockType("Q2_K", 10, 256, 84, lambda grid: _q2_k_affine(grid) is not None, _encode_q2_k),
    BlockType("Q3_K", 11, 256, 110, _within(-4, 3), _encode_q3_k),
    BlockType("Q4_0", 2, 32, 18, _within(-8, 7), _encode_q4_0),
)}
# Automatic choice: the first type that holds the tensor's integers and whose block its scales fit. Every
# type in it has kernels on each llama.cpp backend (CPU, CUDA, Metal, ...); TQ2_0 / TQ1_0 (CPU only in
# mainline llama.cpp) are written only when asked for: qtype="TQ2_0" (strict) or qtype=("TQ2_0", *AUTO_ORDER).
AUTO_ORDER = ("Q1_0", "Q2_0", "Q2_K", "Q3_K", "Q4_0")


# Embedding table and LM head (embed_bits / head_bits): types every llama.cpp backend reads rows of
# (get_rows) and multiplies by. Q8_0 (32 → 34 B: d | 32 int8) holds the 8-bit grid −128…127 exactly.
def _encode_q8_0(k: np.ndarray, d: np.ndarray, _grid) -> np.ndarray:
    return np.concatenate([_f16_bytes(d), k.astype(np.int8).view(np.uint8)], axis=1)


BLOCK_TYPES["Q8_0"] = BlockType("Q8_0", 8, 32, 34, _within(-128, 127), _encode_q8_0)
TABLE_ORDER = ("Q4_0", "Q8_0")  # the embedding / LM head: the first that holds the table's integers exactly


_TYPE_NAMES = {bt.type_id: bt.name for bt in BLOCK_TYPES.values()}


def _decode_q1_0(raw: np.ndarray) -> np.ndarray:
    """(n, 18) Q1_0 blocks → (n, 128) float32, as llama.cpp's dequantize_row_q1_0 defines them."""
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    bits = (raw[:, 2:, None] >> np.arange(8, dtype=np.uint8)) & 1
    return np.where(bits.reshape(-1, 128) == 1, d, -d)


def _decode_q2_0(raw: np.ndarray) -> np.ndarray:
    """(n, 18) Q2_0 blocks → (n, 64) float32: d · (u − 1)."""
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)
    u = (raw[:, 2:, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3
    return (u.reshape(-1, 64).astype(np.float32) - 1) * d


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: name, GGML type name (or "type N"), shape (rows first), raw bytes."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize(self) -> np.ndarray:
        """The float32 values; Q1_0 / Q2_0 decoded here (gguf-py 0.19 has no decoder for them), the rest by
        gguf-py."""
        import gguf

        decoders = {"Q1_0": (_decode_q1_0, 18), "Q2_0": (_decode_q2_0, 18)}
        if self.type_name in decoders:
            decode, size = decoders[self.type_name]
            return decode(self.data.reshape(-1, size)).reshape(self.shape)
        qtype = gguf.GGMLQuantizationType[self.type_name]
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            return self.data.view(np.float32 if qtype.name == "F32" else np.float16).astype(np.float32).reshape(self.shape)
        return gguf.quants.dequantize(self.data, qtype).reshape(self.shape)


def read_gguf_tensors(path: str | os.PathLike) -> dict[str, GGUFTensor]:
    """The tensors of a GGUF file by name, read with a small parser of the GGUF v3 layout (header, key-value
    pairs skipped, tensor infos, aligned data) because gguf-py 0.19's GGUFReader refuses files holding a type it
    does not know (Q2_0)."""
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = np.frombuffer(data, dtype=np.dtype(fmt).newbyteorder("<"), count=1, offset=pos)[0]
        pos += np.dtype(fmt).itemsize
        return value.item()

    def string() -> str:
        nonlocal pos
        n = take("u8")
        pos += n
        return bytes(data[pos - n:pos]).decode("utf-8")

    scalar = {0: "u1", 1: "i1", 2: "u2", 3: "i2", 4: "u4", 5: "i4", 6: "f4", 7: "u1", 10: "u8", 11: "i8", 12: "f8"}

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype == 9:
            item, n = take("u4"), take("u8")
            if item in scalar:  # skip arrays of numbers in one step
                pos += n * np.dtype(scalar[item]).itemsize
                return None
            return [value(item) for _ in range(n)]
        return take(scalar[vtype])

    if bytes(data[:4]) != b"GGUF":
        raise UserError(f"{path}: not a GGUF file")
    pos = 4
    take("u4")  # version
    n_tensors, n_kv = take("u8"), take("u8")
    alignment = 32
    for _ in range(n_kv):
        key = string()
        v = value(take("u4"))
        if key == "general.alignment":
            alignment = int(v)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("u8") for _ in range(take("u4"))]
        type_id, offset = take("u4"), take("u8")
        infos.append((name, tuple(reversed(dims)), type_id, offset))
    start = -(-pos // alignment) * alignment
    out = {}
    for name, shape, type_id, offset in infos:
        try:
            type_name = gguf.GGMLQuantizationType(type_id).name
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except ValueError:
            type_name = _TYPE_NAMES.get(type_id, f"type {type_id}")
            if type_name not in BLOCK_TYPES:
                raise UserError(f"{path}: tensor {name} has GGML type {type_id}, which this reader does not know")
            block, size = BLOCK_TYPES[type_name].block, BLOCK_TYPES[type_name].type_size
        n_bytes = math.prod(shape) // block * size
        out[name] = GGUFTensor(name, type_name, shape, data[start + offset:start + offset + n_bytes])
    return out


# --------------------------------------------------------------------------------------------------
# One linear layer: integers and scales (quantized) or a float weight
# --------------------------------------------------------------------------------------------------

def _aligned(q: LayerIntegers, block: int) -> bool:
    n, groups = q.k.shape[1], q.scale.shape[1]
    return n % block == 0 and (n // groups) % block == 0


def ggml_type_for(q: LayerIntegers, order: tuple[str, ...] = AUTO_ORDER) -> BlockType | None:
    """The GGML block type for one tensor, from its own integers and scale groups: the first of ``order`` that
    holds every integer of ``q.grid`` and whose block the scales fit (constant over each block); None if none
    does. Any tensor with its own bits / group size (per-layer bits, a quantized embedding) gets its type here."""
    for candidate in order:
        bt = BLOCK_TYPES[candidate]
        if bt.holds(q.grid) and _aligned(q, bt.block):
            return bt
    return None


def _choose(name: str, q: LayerIntegers, order: tuple[str, ...], fallback: str) -> BlockType | None:
    """``ggml_type_for`` with the refusal: None = write Ŵ as F16 (``fallback="f16"``); ``UserError`` if
    refused."""
    n, groups = q.k.shape[1], q.scale.shape[1]
    scales = "per-row scales" if groups == 1 else f"group_size {n // groups}"
    bt = ggml_type_for(q, order)
    if bt is not None:
        return bt
    if fallback == "f16":
        return None
    if order != AUTO_ORDER and len(order) == 1:
        bt = BLOCK_TYPES[order[0]]
        why = (f"{bt.name} cannot hold {q.bits}-bit levels (integers {list(q.grid)})" if not bt.holds(q.grid) else
               f"{bt.name} blocks of {bt.block} need in_features ({n}) and the scale group ({scales}) to be "
               f"multiples of {bt.block}")
        raise UserError(f"GGUF export: layer {name}: {why}; omit qtype (--gguf_qtype) to let paretoq choose, or pass fallback='f16' (--gguf_fallback f16)")
    raise UserError(f"GGUF export: layer {name} ({q.bits}-bit, {scales}, in_features {n}) fits none of "
                    f"{', '.join(order)} exactly: the scale must be constant over blocks of 32 (Q4_0), 64 (Q2_0), 128 "
                    "(Q1_0) or 256 (TQ/K types); train with group_size a multiple of 32 (or per-row scales), or pass fallback='f16' (--gguf_fallback f16)")


def _encode(q: LayerIntegers, bt: BlockType) -> tuple[np.ndarray, float]:
    """(bytes (out, n/block·type_size) uint8, max relative rounding of the scales to fp16)."""
    out, n = q.k.shape
    per_group = n // q.scale.shape[1]
    s = q.scale.repeat_interleave(per_group // bt.block, dim=1).numpy()  # one scale per block
    d = s.astype(np.float16)
    if not np.isfinite(d).all():
        raise UserError(f"GGUF export: a scale of {float(s.max()):.4g} does not fit in fp16 (max 65504)")
    rounding = float(np.max(np.abs(d.astype(np.float64) - s) / s))
    blocks = bt.encode(q.k.numpy().reshape(-1, bt.block).astype(np.int16), d.reshape(-1), q.grid)
    return np.ascontiguousarray(blocks.reshape(out, -1)), rounding


def _heads_interleaved(rows: int, heads: int) -> torch.Tensor:
    """Row order that turns transformers' half-split RoPE rows into llama.cpp's adjacent pairs, per head."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


# --------------------------------------------------------------------------------------------------
# Tokenizer → GGUF vocabulary
# --------------------------------------------------------------------------------------------------

def _pre_tokenizer_name(pre: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer we recognise by structure, else None."""
    def byte_level(p):
        return p.get("type") == "ByteLevel" and p.get("use_regex", True)

    if pre and byte_level(pre):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers", [])
        if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
                and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex", True):
            return "smollm"
    return None


def _tokenizer_source(tokenizer: Any, model_dir: Path | None) -> tuple[dict, Any]:
    """(tokenizer.json as a dict, a transformers tokenizer or None) from whatever the caller has."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer) if tokenizer is not None else model_dir
        if path is None:
            raise UserError("GGUF export needs the tokenizer: pass tokenizer= (a transformers tokenizer or the "
                            "folder with tokenizer.json)")
        folder = path if path.is_dir() else path.parent
        hf = None
        if (folder / "tokenizer_config.json").is_file() or not (folder / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            try:  # for the special-token ids and the chat template
                hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError, KeyError, TypeError):
                hf = None
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            try:
                return json.loads(file.read_text(encoding="utf-8")), hf
            except (OSError, ValueError) as e:
                raise UserError(f"{file} is not a readable tokenizer.json: {e}") from None
        if hf is None:
            raise UserError(f"GGUF export needs {file} (a fast tokenizer); pass tokenizer= if it lives elsewhere")
        tokenizer = hf
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise UserError(f"GGUF export needs a fast (tokenizers-backed) tokenizer, got {type(tokenizer).__name__}")
    return json.loads(backend.to_str()), tokenizer if backend is not tokenizer else None


def _special_id(hf, config, what: str) -> int | None:
    value = getattr(hf, f"{what}_token_id", None) if hf is not None else None
    if value is None and what in ("bos", "eos", "pad"):
        value = getattr(config, f"{what}_token_id", None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
    return None if value is None else int(value)


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _write_vocab(writer, tokenizer: Any, model_dir: Path | None, config, vocab_size: int,
                 tokenizer_pre: str | None) -> None:
    """tokenizer.ggml.*: byte-level BPE → llama.cpp "gpt2"; SentencePiece-style BPE (byte_fallback) → "llama"."""
    import gguf
    from tokenizers import Tokenizer

    spec, hf = _tokenizer_source(tokenizer, model_dir)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"GGUF export writes BPE tokenizers; this tokenizer.json has model type {model.get('type')!r}")
    spm = bool(model.get("byte_fallback"))
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.BYTE if spm and _BYTE_TOKEN.fullmatch(text) else gguf.TokenType.NORMAL
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    if spm and model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = gguf.TokenType.UNKNOWN
    merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    fast = Tokenizer.from_str(json.dumps(spec))

    if spm:
        # llama.cpp's SentencePiece tokenizer merges the adjacent pair whose result has the highest score:
        # score = −(rank of the first merge that makes the token) reproduces the BPE merge order.
        rank: dict[str, int] = {}
        for r, (a, b) in enumerate(merges):
            rank.setdefault(a + b, r)
        scores = [0.0] * size
        for text, i in vocab.items():
            if len(text) > 1 and types[i] == gguf.TokenType.NORMAL:
                scores[i] = -float(rank.get(text, len(merges) + 1))
        pieces = fast.encode("a b", add_special_tokens=False).tokens
        if "▁b" not in "".join(pieces):
            raise UserError("GGUF export: this byte_fallback BPE tokenizer does not mark spaces with '▁' as "
                            "SentencePiece does, so llama.cpp's 'llama' tokenizer would not reproduce it")
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre(tokenizer_pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix("".join(pieces).startswith("▁"))
    else:
        pre = tokenizer_pre or _pre_tokenizer_name(spec.get("pre_tokenizer"))
        if pre is None:
            raise UserError(f"GGUF export: the tokenizer's pre-tokenizer {json.dumps(spec.get('pre_tokenizer'))[:120]} "
                            "has no llama.cpp name paretoq knows; pass tokenizer_pre= (e.g. 'llama-bpe', 'qwen2', "
                            "'gpt-2', 'smollm')")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([f"{a} {b}" for a, b in merges])
    ids = {w: _special_id(hf, config, w) for w in ("bos", "eos", "unk", "pad")}
    if ids["unk"] is None and model.get("unk_token") in vocab:
        ids["unk"] = vocab[model["unk_token"]]
    for what, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if ids[what] is not None and 0 <= ids[what] < size:
            add(ids[what])
    # add_bos / add_eos: what the tokenizer's post-processor does to a plain text
    plain, full = fast.encode("a", add_special_tokens=False).ids, fast.encode("a").ids
    writer.add_add_bos_token(ids["bos"] is not None and full[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]])
    writer.add_add_eos_token(ids["eos"] is not None and full[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]])
    template = getattr(hf, "chat_template", None) if hf is not None else None
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# --------------------------------------------------------------------------------------------------
# The model → GGUF
# --------------------------------------------------------------------------------------------------

_LAYER_TENSORS = {  # transformers module (inside model.layers.N) → llama.cpp tensor (blk.N.*)
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


@dataclass
class _TensorRecord:
    """What was written for one tensor: GGUF name, GGML type, shape and how exact it is."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]
    bits: float | None = None  # ParetoQ bits of a quantized layer, None for float tensors
    scale_rounding: float = 0.0  # max relative rounding of the block scales to fp16


def _trained_activation_block(module: nn.Module) -> int | None:
    """The block of a layer's 8-bit activations in training when it had blocks (``a_group_size``), else None
    (every quantized module's ``a_block`` is None unless a_bits=8 with a block size)."""
    return getattr(module, "a_block", None)


class _Writer:
    """Collects tensors (and a record of each) for one GGUFWriter."""

    def __init__(self, writer, float_type: str, order: tuple[str, ...], fallback: str):
        self.writer, self.float_type, self.order, self.fallback = writer, float_type, order, fallback
        self.records: list[_TensorRecord] = []

    def f32(self, name: str, tensor: torch.Tensor) -> None:
        arr = tensor.detach().float().cpu().numpy()
        self.writer.add_tensor(name, np.ascontiguousarray(arr))
        self.records.append(_TensorRecord(name, "F32", tuple(arr.shape)))

    def float_matrix(self, name: str, weight: torch.Tensor, ftype: str | None = None) -> None:
        import gguf

        ftype = ftype or self.float_type
        arr = np.ascontiguousarray(weight.detach().float().cpu().numpy())
        if ftype == "q8_0" and arr.shape[-1] % 32:
            logger.warning("GGUF export: %s has rows of %d values (not a multiple of 32): written as F16 instead "
                           "of Q8_0", name, arr.shape[-1])
            ftype = "f16"
        if ftype == "f32":
            self.writer.add_tensor(name, arr)
        elif ftype == "f16":
            self.writer.add_tensor(name, arr.astype(np.float16))
        else:
            gtype = gguf.GGMLQuantizationType.BF16 if ftype == "bf16" else gguf.GGMLQuantizationType.Q8_0
            self.writer.add_tensor(name, gguf.quants.quantize(arr, gtype), raw_dtype=gtype)
        self.records.append(_TensorRecord(name, ftype.upper(), tuple(arr.shape)))

    def integers(self, name: str, q: LayerIntegers, source: str, order: tuple[str, ...] | None = None,
                 a_block: int | None = None) -> None:
        """A quantized matrix (integers k and scales) in the GGML type ``ggml_type_for`` picks from its own grid
        and scale groups (``order``: default the export's), or refused / F16 Ŵ per ``fallback``. ``a_block``:
        the layer was trained with 8-bit activations in blocks of that many features, so the types llama.cpp
        runs with that activation block come first (a warning when none of them fits)."""
        order = order or self.order
        if a_block is not None:
            order = tuple(sorted(order, key=lambda t: BLOCK_TYPES[t].activation_block != a_block))
        bt = _choose(source, q, order, self.fallback)
        if bt is not None and a_block is not None and bt.activation_block != a_block:
            logger.warning("GGUF export: %s was trained with 8-bit activations in blocks of %d, but its type %s "
                           "makes llama.cpp round them in blocks of %d", source, a_block, bt.name,
                           bt.activation_block)
        if bt is None:
            self.float_matrix(name, q.dequantized().float(), "f16")
            self.records[-1].bits = q.bits
            return
        blocks, rounding = _encode(q, bt)
        if type(bt.qtype) is int:
            # a type gguf-py does not know (Q2_0 in gguf 0.19): the bytes as int8 (so that gguf-py keeps the
            # shape given instead of converting a byte shape), the element shape and ggml's type id
            self.writer.add_tensor(name, blocks.view(np.int8), raw_shape=tuple(q.k.shape), raw_dtype=bt.type_id)
        else:
            self.writer.add_tensor(name, blocks, raw_dtype=bt.qtype)
        self.records.append(_TensorRecord(name, bt.name, tuple(q.k.shape), q.bits, rounding))

    def table(self, name: str, module: nn.Module, source: str) -> None:
        """A quantized embedding / LM head (``name`` without ".weight") as Q4_0 (levels within −8…7) or Q8_0,
        exact up to the fp16 rounding of the scales; else refused, or Ŵ as F16 with ``fallback="f16"``."""
        q = layer_integers(module)
        n, groups = q.k.shape[1], q.scale.shape[1]
        if ggml_type_for(q, TABLE_ORDER) is None and self.fallback != "f16":
            raise UserError(f"GGUF export: {source} ({q.bits}-bit, {'per-row scales' if groups == 1 else f'group_size {n // groups}'}, "
                            f"width {n}) fits neither Q4_0 nor Q8_0 exactly: the scale must be constant over blocks "
                            "of 32; quantize it with a group size that is a multiple of 32 (--embed_group_size / "
                            "--head_group_size 32), or pass fallback='f16' (--gguf_fallback f16)")
        self.integers(f"{name}.weight", q, source, TABLE_ORDER, _trained_activation_block(module))

    def linear(self, name: str, module: nn.Linear, heads: int | None = None, source: str | None = None) -> None:
        """A Linear weight (``name`` without ".weight") and its bias; ``heads``: permute rows for RoPE;
        ``source``: the module's name in the model, for messages."""
        perm = None if heads is None else _heads_interleaved(module.out_features, heads)
        q = layer_integers(module)
        if q is None:
            weight = module.weight.detach()
            self.float_matrix(f"{name}.weight", weight if perm is None else weight[perm])
        else:
            if perm is not None:
                q = q.permute_rows(perm)
            self.integers(f"{name}.weight", q, source or name, a_block=_trained_activation_block(module))
        bias = getattr(module, "bias", None)
        if bias is not None:
            self.f32(f"{name}.bias", bias if perm is None else bias.detach()[perm])


def _rope_metadata(writer, arch: str, config, head_dim: int, w: _Writer) -> None:
    import gguf

    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    writer.add_rope_freq_base(float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    if rope_type == "default":
        return
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif rope_type == "llama3" and arch == "llama":
        # llama.cpp divides each frequency by rope_freqs[i]: the ratio of plain to llama3 frequencies
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        w.f32("rope_freqs.weight", (plain / scaled.double()).float())
    elif rope_type == "longrope" and arch == "minicpm":
        orig = int(params["original_max_position_embeddings"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(orig)
        scale = config.max_position_embeddings / orig
        if scale > 1:
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
        w.f32("rope_factors_long.weight", torch.tensor(params["long_factor"], dtype=torch.float32))
        w.f32("rope_factors_short.weight", torch.tensor(params["short_factor"], dtype=torch.float32))
    else:
        raise UserError(f"GGUF export: rope type {rope_type!r} of a {arch} model is not supported "
                        "(default, linear, llama3 for Llama; longrope for MiniCPM)")


def _file_type(records: list[_TensorRecord]):
    """general.file_type: the type holding most of the matrix weights."""
    from gguf import LlamaFileType

    mapping = {"Q1_0": 40, "Q2_0": 41,  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q1_0 / _Q2_0 (gguf-py 0.19 lacks Q2_0)
               "Q4_0": LlamaFileType.MOSTLY_Q4_0, "TQ1_0": LlamaFileType.MOSTLY_TQ1_0,
               "TQ2_0": LlamaFileType.MOSTLY_TQ2_0, "Q2_K": LlamaFileType.MOSTLY_Q2_K,
               "Q3_K": LlamaFileType.MOSTLY_Q3_K_S, "F16": LlamaFileType.MOSTLY_F16,
               "BF16": LlamaFileType.MOSTLY_BF16, "Q8_0": LlamaFileType.MOSTLY_Q8_0, "F32": LlamaFileType.ALL_F32}
    counts: dict[str, int] = {}
    for r in records:
        if len(r.shape) == 2:
            counts[r.ggml_type] = counts.get(r.ggml_type, 0) + math.prod(r.shape)
    quantized = {t: c for t, c in counts.items() if t in BLOCK_TYPES}
    pool = quantized or counts
    return mapping[max(pool, key=pool.get)] if pool else LlamaFileType.ALL_F32


def _check_options(qtype, float_type, fallback) -> tuple[tuple[str, ...], str, str]:
    order = AUTO_ORDER
    if qtype is not None:
        order = tuple(str(t).upper() for t in ((qtype,) if isinstance(qtype, str) else qtype))
        bad = [t for t in order if t not in BLOCK_TYPES]
        if bad or not order:
            raise UserError(f"GGUF qtype {bad[0] if bad else qtype!r} is not one paretoq writes exactly: use one of "
                            f"{', '.join(BLOCK_TYPES)} (or omit it)")
    float_type = str(float_type).lower()
    if float_type not in FLOAT_TYPES:
        raise UserError(f"GGUF float_type {float_type!r} is unknown: use one of {', '.join(FLOAT_TYPES)}")
    if fallback not in FALLBACKS:
        raise UserError(f"GGUF fallback {fallback!r} is unknown: use one of {', '.join(FALLBACKS)}")
    return order, float_type, fallback


def export_gguf(model_or_folder: nn.Module | str | os.PathLike, output_path: str | os.PathLike, *,
                tokenizer: Any = None, qtype: str | tuple[str, ...] | None = None, float_type: str = "f16",
                fallback: str = "refuse", tokenizer_pre: str | None = None, name: str | None = None) -> Path:
    """Write a GGUF file that llama.cpp loads; the model given is not modified.

    Args:
        model_or_folder: a Llama or MiniCPM causal LM (fake-quant ``QuantLinear`` layers, or plain), or its
            folder (loaded with ``paretoq.loading.load_model``; its tokenizer.json is used).
        output_path: the .gguf file (written to a temporary file first, renamed when complete).
        tokenizer: a fast transformers tokenizer or a folder/tokenizer.json (default: the model's folder).
        qtype: the GGML type(s) for quantized layers, tried in order per layer: one of "Q1_0", "Q2_0", "TQ2_0",
            "TQ1_0", "Q2_K", "Q3_K", "Q4_0" (every layer must take it) or a sequence of them; default ``AUTO_ORDER``
            (Q1_0, Q2_0, Q2_K, Q3_K, Q4_0: types every llama.cpp backend runs): per layer, the first that holds its
            levels exactly and whose block its scales fit.
        float_type: unquantized matrices (embeddings, untied output, plain Linear layers): "f16" (default),
            "f32", "bf16" or "q8_0" (smaller, approximate). Norms, biases and RoPE factors are F32.
        fallback: "refuse" (default: ``UserError`` for a layer no block type holds exactly) or "f16"
            (write such a layer's Ŵ as F16).
        tokenizer_pre: llama.cpp pre-tokenizer name, when it cannot be read off the tokenizer.json.
        name: general.name (default: the model folder's name).

    Returns the path written.
    """
    import gguf

    order, float_type, fallback = _check_options(qtype, float_type, fallback)
    model_dir = None
    if isinstance(model_or_folder, (str, os.PathLike)):
        from paretoq.loading import load_model

        model_dir = Path(model_or_folder)
        model = load_model(model_dir, dtype=torch.float32)
    else:
        model = model_or_folder
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        if source and Path(source).is_dir():
            model_dir = Path(source)
    config = model.config
    arch = ARCHITECTURES.get(getattr(config, "model_type", None))
    if arch is None:
        raise UserError(f"GGUF export supports model types {', '.join(ARCHITECTURES)}; this model is "
                        f"{getattr(config, 'model_type', None)!r}")
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError(f"GGUF export: {type(model).__name__} has no model.layers")

    output = Path(output_path)
    if output.is_dir():
        raise UserError(f"GGUF output {output} is a folder: give a file name ending in .gguf")
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(output, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            records = _write_model(writer, model, config, arch, base, layers, tokenizer, model_dir, order, float_type,
                                   fallback, tokenizer_pre, name)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    _log_summary(output, records)
    return output


@torch.no_grad()
def _write_model(writer, model, config, arch, base, layers, tokenizer, model_dir, order, float_type, fallback,
                 tokenizer_pre, name) -> list[_TensorRecord]:
    import gguf

    w = _Writer(writer, float_type, order, fallback)
    hidden, n_layers = config.hidden_size, config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or hidden // n_head
    vocab_size = config.vocab_size

    writer.add_name(name or (model_dir.name if model_dir is not None else type(model).__name__))
    writer.add_quantized_by("paretoq")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UserError(f"GGUF export: hidden_act {config.hidden_act!r} is not supported (llama.cpp's llama and "
                        "minicpm use SiLU)")
    if arch == "minicpm":
        writer.add_embedding_scale(float(config.scale_emb))
        writer.add_residual_scale(float(config.scale_depth) / math.sqrt(n_layers))
        writer.add_logit_scale(float(hidden) / float(config.dim_model_base))
    _rope_metadata(writer, arch, config, head_dim, w)
    qc = getattr(config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else qc
    if isinstance(qc, dict) and qc.get("quant_method") == "paretoq":
        writer.add_float32("paretoq.w_bits", float(qc.get("w_bits")))
        writer.add_uint32("paretoq.group_size", int(qc.get("group_size") or 0))
        for key in ("embed_bits", "head_bits", "a_bits"):
            if key in qc:
                writer.add_float32(f"paretoq.{key}", float(qc[key]))
    _write_vocab(writer, tokenizer, model_dir, config, vocab_size, tokenizer_pre)

    consumed: set[int] = set()

    def take(module: nn.Module) -> nn.Module:
        consumed.update(id(p) for p in module.parameters())
        return module

    if layer_integers(base.embed_tokens) is not None:  # embed_bits: Q4_0 / Q8_0 (Writer.table)
        w.table("token_embd", take(base.embed_tokens), "model.embed_tokens")
    else:
        w.float_matrix("token_embd.weight", take(base.embed_tokens).weight)
    w.f32("output_norm.weight", take(base.norm).weight)
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and (getattr(lm_head, "source", None) is base.embed_tokens
                                    or getattr(lm_head, "weight", None) is getattr(base.embed_tokens, "weight", 0))
    if lm_head is not None and not tied:
        quantized_head = layer_integers(take(lm_head)) is not None
        if not (isinstance(lm_head, nn.Linear) or quantized_head):
            raise UserError(f"GGUF export: lm_head is a {type(lm_head).__name__}, not a Linear layer")
        if quantized_head and getattr(getattr(lm_head, "quant_config", None), "head_bits", 8) != 16:
            w.table("output", lm_head, "lm_head")  # head_bits (a packed head: PackedLinear)
        else:
            w.linear("output", lm_head, source="lm_head")
    elif lm_head is not None:
        take(lm_head)
    for i, layer in enumerate(layers):
        for path, gguf_name in _LAYER_TENSORS.items():
            module = take(layer.get_submodule(path))
            if gguf_name.endswith("_norm"):
                w.f32(f"blk.{i}.{gguf_name}.weight", module.weight)
                continue
            if not (isinstance(module, nn.Linear) or layer_integers(module) is not None):
                raise UserError(f"GGUF export: model.layers.{i}.{path} is a {type(module).__name__}, which GGUF "
                                "export cannot read; export the fake-quant folder instead")
            heads = {"attn_q": n_head, "attn_k": n_kv}.get(gguf_name)
            w.linear(f"blk.{i}.{gguf_name}", module, heads, source=f"model.layers.{i}.{path}")
    left = [n for n, p in model.named_parameters() if id(p) not in consumed]
    if left:
        raise UserError(f"GGUF export: parameter {left[0]} has no place in a llama.cpp {arch} model")
    writer.add_file_type(_file_type(w.records))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return w.records


def _log_summary(output: Path, records: list[_TensorRecord]) -> None:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.ggml_type] = counts.get(r.ggml_type, 0) + math.prod(r.shape)
    worst = max((r.scale_rounding for r in records), default=0.0)
    logger.info("wrote %s (%.2f MiB): %s; block scales within %.2g of ours (fp16 rounding)", output,
                output.stat().st_size / 2**20, ", ".join(f"{t} {c:,}" for t, c in sorted(counts.items())), worst)
