"""GGUF's block formats that quantization-aware distillation tunes, unpacked into integer codes,
block scales and mins, and packed back byte for byte.

    from compress.quantize.blocks import unpack, pack, TUNABLE
    b = unpack(raw, "Q4_0", cols)        # raw: uint8 [rows, row bytes] of one tensor
    w = b.values()                       # float32 [rows, cols] == gguf.quants.dequantize(raw, Q4_0)
    raw2 = pack(b)                       # == raw

Every type here stores a block of 32 weights as w = d * q + m: one float16 scale d per block, signed
integer codes q, and for the "_1" types a float16 min m (0 for the others). ggml's layouts
(ggml-common.h): Q4_0 {d, qs[16]} codes nibble-8; Q4_1 {d, m, qs[16]}; Q5_0 {d, qh[4], qs[16]}
codes (nibble | high bit << 4) - 16; Q5_1 {d, m, qh[4], qs[16]}; Q8_0 {d, int8 qs[32]}. Nibble j
of qs holds weight j in its low half and weight j + 16 in its high half; bit j of qh is weight j's
fifth bit. gguf-py only dequantizes or quantizes whole arrays, so the codes and scales are read here.
The K-quants of llama.cpp's k-quant mixes (Q2_K to Q6_K: two levels of scales over 256 weights) are
kquants.py's; unpack and pack here take every type in TUNABLE.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kquants

BLOCK = 32
# type: (bytes per block, has a min, code offset: stored unsigned code - offset = q, code bits)
LAYOUT = {"Q4_0": (18, False, 8, 4), "Q4_1": (20, True, 0, 4), "Q5_0": (22, False, 16, 5),
          "Q5_1": (24, True, 0, 5), "Q8_0": (34, False, 0, 8)}
TUNABLE = (*LAYOUT, *kquants.LAYOUT)


@dataclass
class Blocks:
    qtype: str
    q: np.ndarray          # int16 [rows, blocks, 32]: signed codes
    d: np.ndarray          # float32 [rows, blocks]: scales (float16 values)
    m: np.ndarray | None   # float32 [rows, blocks]: mins (float16 values), or None

    def values(self) -> np.ndarray:
        """The weights the file holds: float32 [rows, cols]."""
        return kquants.block_values(self.q, self.d, self.m)

    def code_range(self) -> tuple[int, int]:
        _, _, offset, bits = LAYOUT[self.qtype]
        if self.qtype == "Q8_0":
            return -128, 127
        return -offset, (1 << bits) - 1 - offset


def unpack(raw: np.ndarray, qtype: str, cols: int) -> Blocks | kquants.KBlocks:
    """uint8 [rows, row bytes] of a `qtype` tensor -> its codes, scales and mins."""
    if qtype in kquants.LAYOUT:
        return kquants.unpack(raw, qtype, cols)
    size, has_min, offset, bits = LAYOUT[qtype]
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(rows, cols // BLOCK, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if has_min else None
    at = 4 if has_min else 2
    if qtype == "Q8_0":
        return Blocks(qtype, b[..., 2:].copy().view(np.int8).astype(np.int16), d, None)
    high = None
    if bits == 5:
        high = b[..., at:at + 4].copy().view("<u4")[..., 0]     # [rows, blocks]: bit j = weight j's bit 4
        at += 4
    qs = b[..., at:at + 16].astype(np.int16)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)        # [rows, blocks, 32]
    if high is not None:
        bit = (high[..., None] >> np.arange(BLOCK, dtype=np.uint32)) & 1
        codes = codes | (bit.astype(np.int16) << 4)
    return Blocks(qtype, codes - offset, d, m)


def pack(b: Blocks | kquants.KBlocks) -> np.ndarray:
    """The inverse of unpack: uint8 [rows, row bytes]. Scales and mins are rounded to float16."""
    if isinstance(b, kquants.KBlocks):
        return kquants.pack(b)
    size, has_min, offset, bits = LAYOUT[b.qtype]
    lo, hi = b.code_range()
    if b.q.min() < lo or b.q.max() > hi:
        raise ValueError(f"{b.qtype} codes must lie in [{lo}, {hi}]")
    rows, nb, _ = b.q.shape
    parts = [b.d.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)]
    if has_min:
        parts.append(b.m.astype(np.float16).view(np.uint8).reshape(rows, nb, 2))
    if b.qtype == "Q8_0":
        parts.append(b.q.astype(np.int8).view(np.uint8))
    else:
        u = (b.q + offset).astype(np.uint32)                         # [rows, blocks, 32]
        if bits == 5:
            high = ((u >> 4) << np.arange(BLOCK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
            parts.append(high.astype("<u4").view(np.uint8).reshape(rows, nb, 4))
        nib = u & 0xF
        parts.append((nib[..., :16] | (nib[..., 16:] << 4)).astype(np.uint8))
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == size
    return out.reshape(rows, nb * size)
