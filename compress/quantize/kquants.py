"""The K-quants that llama.cpp's k-quant mixes are made of (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), unpacked
into codes, sub-block scales and mins and packed back byte for byte. gguf-py dequantizes them but
does not quantize them, so the layouts are read and written here (ggml-common.h, checked against
gguf-py's dequantizer and llama.cpp's own quantizer in tests/test_qad_kquants.py).

    b = unpack(raw, "Q4_K", cols)        # raw: uint8 [rows, row bytes]
    b.values()                           # == gguf.quants.dequantize(raw, Q4_K)
    pack(b)                              # == raw

A K-quant holds 256 weights as sub-blocks with two levels of scales: one float16 super-scale D per
256 and a small integer sc per sub-block, so a sub-block's scale is D * sc (and its min Dmin * mn).
- Q2_K {scales[16], qs[64], D, Dmin}: 16 sub-blocks of 16, w = D*sc*q - Dmin*mn, q in 0..3, sc
  the low and mn the high nibble of a scales byte; weight 128n+32j+l is bits 2j of qs byte 32n+l.
- Q3_K {hmask[32], qs[64], scales[12], D}: 16 sub-blocks of 16, w = D*sc*q, q in -4..3 (its two
  low bits as Q2_K's, its third bit 4n+j of hmask byte l), sc in -32..31 (stored sc+32, 6 bits:
  low nibbles in bytes 0-7, sub-block i in the low half of byte i % 8 for i < 8 and the high half
  for i >= 8; the two high bits in bytes 8-11, bits 2*(i // 4) of byte 8 + i % 4).
- Q4_K {D, Dmin, scales[12], qs[128]}: 8 sub-blocks of 32, w = D*sc*q - Dmin*mn, q in 0..15,
  sc and mn 6-bit (0..63) packed in 12 bytes; qs byte l of 64-chunk c holds weight 64c+l in its
  low nibble and 64c+32+l in its high nibble.
- Q5_K {D, Dmin, scales[12], qh[32], qs[128]}: Q4_K with a fifth bit, q in 0..31: bit 2c (low
  half) or 2c+1 (high half) of qh byte l.
- Q6_K {ql[128], qh[64], int8 scales[16], D}: 16 sub-blocks of 16, w = D*sc*q, q in -32..31
  (stored q+32, 6 bits: low nibbles in ql, the two high bits in qh), sc in -128..127.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPER = 256
# type: (bytes per 256, weights per sub-block, sub-scale (and min) range, code range, has mins)
LAYOUT = {"Q2_K": (84, 16, (0, 15), (0, 3), True), "Q3_K": (110, 16, (-32, 31), (-4, 3), False),
          "Q4_K": (144, 32, (0, 63), (0, 15), True), "Q5_K": (176, 32, (0, 63), (0, 31), True),
          "Q6_K": (210, 16, (-128, 127), (-32, 31), False)}


@dataclass
class KBlocks:
    qtype: str
    q: np.ndarray            # int16 [rows, sub-blocks, sub-block size]: codes
    D: np.ndarray            # float32 [rows, super-blocks]: super-scales (float16 values)
    sc: np.ndarray           # int16 [rows, sub-blocks]: sub-block scales
    Dmin: np.ndarray | None  # float32 [rows, super-blocks]: min super-scales (Q2_K, Q4_K, Q5_K), else None
    mn: np.ndarray | None    # int16 [rows, sub-blocks]: sub-block mins, else None

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


def _bits(x: np.ndarray, shifts, width: int) -> np.ndarray:
    """The `width`-bit fields of x at each of `shifts` (a new axis before the last)."""
    return (x[..., None, :] >> np.asarray(shifts, dtype=np.int16)[:, None]) & ((1 << width) - 1)


def _six_bit_pairs(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes [.., 12] -> (sc, mn) [.., 8]: sub-blocks 0-3 in the low 6 bits of
    bytes 0-3 (sc) and 4-7 (mn); 4-7 in the nibbles of bytes 8-11 with their high 2 bits on top of
    bytes 0-7."""
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc, mn


def _pack_six_bit_pairs(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    sc, mn = sc.astype(np.uint16), mn.astype(np.uint16)
    return np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), mn[..., :4] | ((mn[..., 4:] >> 4) << 6),
                           (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)], -1).astype(np.uint8)


def unpack(raw: np.ndarray, qtype: str, cols: int) -> KBlocks:
    size, sub = LAYOUT[qtype][:2]
    rows, ns = raw.shape[0], cols // SUPER
    b = np.ascontiguousarray(raw).reshape(rows, ns, size)
    i16 = lambda x: x.astype(np.int16)   # noqa: E731
    out = lambda q, D, sc, Dmin=None, mn=None: KBlocks(   # noqa: E731
        qtype, q.reshape(rows, ns * (SUPER // sub), sub), D, sc.reshape(rows, -1), Dmin,
        None if mn is None else mn.reshape(rows, -1))
    if qtype in ("Q2_K", "Q3_K"):
        low = _bits(i16(b[..., 16:80] if qtype == "Q2_K" else b[..., 32:96]).reshape(rows, ns, 2, 32), (0, 2, 4, 6), 2)
        if qtype == "Q2_K":                                                   # [rows, ns, n, j, l]
            s = i16(b[..., 0:16])
            return out(low, _f16(b[..., 80:82]), s & 0xF, _f16(b[..., 82:84]), s >> 4)
        high = _bits(i16(b[..., 0:32]), range(8), 1).reshape(rows, ns, 2, 4, 32)
        s = i16(b[..., 96:108])
        sc = np.concatenate([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], -1) | (_bits(s[..., 8:12], (0, 2, 4, 6), 2)
                                                                           .reshape(rows, ns, 16) << 4)
        return out((low | (high << 2)) - 4, _f16(b[..., 108:110]), sc - 32)
    if qtype in ("Q4_K", "Q5_K"):
        at = 16 if qtype == "Q4_K" else 48
        qs = i16(b[..., at:at + 128]).reshape(rows, ns, 4, 1, 32)
        q = np.concatenate([qs & 0xF, qs >> 4], axis=3)                      # [rows, ns, chunk, half, 32]
        if qtype == "Q5_K":
            q = q | (_bits(i16(b[..., 16:48]), range(8), 1).reshape(rows, ns, 4, 2, 32) << 4)
        sc, mn = _six_bit_pairs(i16(b[..., 4:16]))
        return out(q, _f16(b[..., 0:2]), sc, _f16(b[..., 2:4]), mn)
    ql = i16(b[..., 0:128]).reshape(rows, ns, 2, 64)
    qh = i16(b[..., 128:192]).reshape(rows, ns, 2, 32)
    lo, hi = ql[..., :32], ql[..., 32:]
    q = np.concatenate([(lo & 0xF) | ((qh & 3) << 4), (hi & 0xF) | (((qh >> 2) & 3) << 4),
                        (lo >> 4) | (((qh >> 4) & 3) << 4), (hi >> 4) | (((qh >> 6) & 3) << 4)], -1) - 32
    return out(q, _f16(b[..., 208:210]), b[..., 192:208].copy().view(np.int8).astype(np.int16))


def _check(name: str, x: np.ndarray, bounds: tuple[int, int]) -> None:
    if x.min() < bounds[0] or x.max() > bounds[1]:
        raise ValueError(f"{name} must lie in [{bounds[0]}, {bounds[1]}]")


def _or_shifted(fields: np.ndarray, shifts) -> np.ndarray:
    """The inverse of _bits: fields [.., k, n] each shifted by its shift and or-ed, uint8 [.., n]."""
    sh = np.asarray(shifts, dtype=np.uint8)[:, None]
    return np.bitwise_or.reduce(fields.astype(np.uint8) << sh, axis=-2).astype(np.uint8)


def pack(b: KBlocks) -> np.ndarray:
    """The inverse of unpack: uint8 [rows, row bytes]. Super-scales are rounded to float16."""
    size, sub, srange, qrange, has_min = LAYOUT[b.qtype]
    _check(f"{b.qtype} codes", b.q, qrange)
    _check(f"{b.qtype} sub-block scales", b.sc, srange)
    if has_min:
        _check(f"{b.qtype} sub-block mins", b.mn, (0, srange[1]))
    rows, ns = b.q.shape[0], b.D.shape[1]
    f16 = lambda x: x.astype(np.float16).view(np.uint8).reshape(rows, ns, 2)   # noqa: E731
    subs = lambda x: x.reshape(rows, ns, -1)                                  # noqa: E731
    if b.qtype in ("Q2_K", "Q3_K"):
        u = (b.q.reshape(rows, ns, 2, 4, 32) + (4 if b.qtype == "Q3_K" else 0)).astype(np.uint8)
        qs = _or_shifted(u & 3, (0, 2, 4, 6)).reshape(rows, ns, 64)
        if b.qtype == "Q2_K":
            out = [(subs(b.sc) | (subs(b.mn) << 4)).astype(np.uint8), qs, f16(b.D), f16(b.Dmin)]
        else:
            hmask = _or_shifted((u >> 2).reshape(rows, ns, 8, 32), range(8))
            s = (subs(b.sc) + 32).astype(np.uint8)
            scales = np.concatenate([(s[..., 0:8] & 0xF) | ((s[..., 8:16] & 0xF) << 4),
                                     _or_shifted((s >> 4).reshape(rows, ns, 4, 4), (0, 2, 4, 6))], -1)
            out = [hmask, qs, scales, f16(b.D)]
    elif b.qtype in ("Q4_K", "Q5_K"):
        u = b.q.reshape(rows, ns, 4, 2, 32).astype(np.uint8)
        qs = ((u[..., 0, :] & 0xF) | ((u[..., 1, :] & 0xF) << 4)).reshape(rows, ns, 128)
        out = [f16(b.D), f16(b.Dmin), _pack_six_bit_pairs(subs(b.sc), subs(b.mn))]
        if b.qtype == "Q5_K":
            out.append(_or_shifted((u >> 4).reshape(rows, ns, 8, 32), range(8)))
        out.append(qs)
    else:
        u = (b.q.reshape(rows, ns, 2, 4, 32) + 32).astype(np.uint8)     # [.., half, quarter, 32]
        lo, hi = u & 0xF, u >> 4
        ql = np.concatenate([lo[..., 0, :] | (lo[..., 2, :] << 4), lo[..., 1, :] | (lo[..., 3, :] << 4)], -1)
        qh = _or_shifted(hi, (0, 2, 4, 6))
        sc = subs(b.sc).astype(np.int8).view(np.uint8)
        out = [ql.reshape(rows, ns, 128), qh.reshape(rows, ns, 64), sc, f16(b.D)]
    out = np.concatenate(out, -1)
    assert out.shape[-1] == size
    return out.reshape(rows, ns * size)
