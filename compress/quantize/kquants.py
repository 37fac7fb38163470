"""The two K-quants that llama.cpp's k-quant mixes are made of (Q4_K, Q6_K), unpacked into codes,
sub-block scales and mins and packed back byte for byte. gguf-py dequantizes them but does not
quantize them, so the layouts are read and written here (ggml-common.h, checked against gguf-py's
dequantizer and llama.cpp's own quantizer in tests/test_qad_kquants.py).

    b = unpack(raw, "Q4_K", cols)        # raw: uint8 [rows, row bytes]
    b.values()                           # == gguf.quants.dequantize(raw, Q4_K)
    pack(b)                              # == raw

A K-quant holds 256 weights as sub-blocks with two levels of scales: one float16 super-scale D per
256 and a small integer sc per sub-block, so a sub-block's scale is D * sc.
- Q4_K {D, Dmin, scales[12], qs[128]}: 8 sub-blocks of 32, w = D*sc*q - Dmin*mn, q in 0..15,
  sc and mn 6-bit (0..63) packed in 12 bytes; qs byte l of 64-chunk c holds weight 64c+l in its
  low nibble and 64c+32+l in its high nibble.
- Q6_K {ql[128], qh[64], int8 scales[16], D}: 16 sub-blocks of 16, w = D*sc*q, q in -32..31
  (stored q+32, 6 bits: low nibbles in ql, the two high bits in qh), sc in -128..127.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPER = 256
# type: (bytes per 256, weights per sub-block, sub-scale range, code range)
LAYOUT = {"Q4_K": (144, 32, (0, 63), (0, 15)), "Q6_K": (210, 16, (-128, 127), (-32, 31))}


@dataclass
class KBlocks:
    qtype: str
    q: np.ndarray            # int16 [rows, sub-blocks, sub-block size]: codes
    D: np.ndarray            # float32 [rows, super-blocks]: super-scales (float16 values)
    sc: np.ndarray           # int16 [rows, sub-blocks]: sub-block scales
    Dmin: np.ndarray | None  # float32 [rows, super-blocks]: Q4_K's min super-scales, else None
    mn: np.ndarray | None    # int16 [rows, sub-blocks]: Q4_K's sub-block mins, else None

    @property
    def per(self) -> int:
        """Sub-blocks per super-block."""
        return SUPER // LAYOUT[self.qtype][1]

    @property
    def d(self) -> np.ndarray:
        """Each sub-block's scale, float32 [rows, sub-blocks]."""
        return np.repeat(self.D, self.per, axis=1) * self.sc.astype(np.float32)

    @property
    def m(self) -> np.ndarray | None:
        """Each sub-block's offset (w = d * q + m), or None."""
        if self.Dmin is None:
            return None
        return -(np.repeat(self.Dmin, self.per, axis=1) * self.mn.astype(np.float32))

    def values(self) -> np.ndarray:
        return block_values(self.q, self.d, self.m)

    def code_range(self) -> tuple[int, int]:
        return LAYOUT[self.qtype][3]

    def scale_range(self) -> tuple[int, int]:
        return LAYOUT[self.qtype][2]


def block_values(q: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """w = d * q + m per block of codes q [rows, blocks, size]: float32 [rows, cols], computed in
    the order gguf-py's dequantizer does, so the values are equal bit for bit."""
    w = d[..., None] * q.astype(np.float32)
    if m is not None:
        w = w + m[..., None]
    return w.reshape(w.shape[0], -1)


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def unpack(raw: np.ndarray, qtype: str, cols: int) -> KBlocks:
    size, sub, _, _ = LAYOUT[qtype]
    rows, ns = raw.shape[0], cols // SUPER
    b = np.ascontiguousarray(raw).reshape(rows, ns, size)
    if qtype == "Q4_K":
        s = b[..., 4:16].astype(np.int16)
        sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
        mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., 16:144].astype(np.int16).reshape(rows, ns, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=3)              # [rows, ns, chunk, half, 32]
        return KBlocks(qtype, q.reshape(rows, ns * 8, 32), _f16(b[..., 0:2]), sc.reshape(rows, -1),
                       _f16(b[..., 2:4]), mn.reshape(rows, -1))
    ql = b[..., 0:128].astype(np.int16).reshape(rows, ns, 2, 64)
    qh = b[..., 128:192].astype(np.int16).reshape(rows, ns, 2, 32)
    lo, hi = ql[..., :32], ql[..., 32:]
    q = np.concatenate([(lo & 0xF) | ((qh & 3) << 4), (hi & 0xF) | (((qh >> 2) & 3) << 4),
                        (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)], -1) - 32
    sc = b[..., 192:208].copy().view(np.int8).astype(np.int16)
    return KBlocks(qtype, q.reshape(rows, ns * 16, 16), _f16(b[..., 208:210]), sc.reshape(rows, -1), None, None)


def _check(name: str, x: np.ndarray, bounds: tuple[int, int]) -> None:
    if x.min() < bounds[0] or x.max() > bounds[1]:
        raise ValueError(f"{name} must lie in [{bounds[0]}, {bounds[1]}]")


def pack(b: KBlocks) -> np.ndarray:
    """The inverse of unpack: uint8 [rows, row bytes]. Super-scales are rounded to float16."""
    size, sub, srange, qrange = LAYOUT[b.qtype]
    _check(f"{b.qtype} codes", b.q, qrange)
    _check(f"{b.qtype} sub-block scales", b.sc, srange)
    rows = b.q.shape[0]
    ns = b.D.shape[1]
    f16 = lambda x: x.astype(np.float16).view(np.uint8).reshape(rows, ns, 2)   # noqa: E731
    if b.qtype == "Q4_K":
        _check("Q4_K sub-block mins", b.mn, srange)
        sc, mn = (x.reshape(rows, ns, 8).astype(np.uint16) for x in (b.sc, b.mn))
        s = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                            (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)], -1).astype(np.uint8)
        q = b.q.reshape(rows, ns, 4, 2, 32).astype(np.uint8)
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, ns, 128)
        out = np.concatenate([f16(b.D), f16(b.Dmin), s, qs], -1)
    else:
        u = (b.q.reshape(rows, ns, 2, 4, 32) + 32).astype(np.uint8)     # [.., half, quarter, 32]
        lo, hi = u & 0xF, u >> 4
        ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], -1)
        qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        sc = b.sc.reshape(rows, ns, 16).astype(np.int8).view(np.uint8)
        out = np.concatenate([ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64), sc, f16(b.D)], -1)
    assert out.shape[-1] == size
    return out.reshape(rows, ns * size)
