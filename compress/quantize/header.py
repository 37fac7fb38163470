"""A GGUF's tensor table, read fast: names, shapes, types and memory-mapped data.

    from compress.quantize.header import tensors_of, tensor_types
    tensor_types("model.gguf")          # {"blk.0.attn_q.weight": "Q4_K", ...}

gguf.GGUFReader parses every metadata value into numpy views, which takes seconds for a 49k-token
vocabulary; the quantize stages read tensor tables many times (the auto mix reads a dozen candidate
files), so here the metadata is skipped by its lengths and only the tensor table is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserError

_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value type -> bytes
STRING, ARRAY = 8, 9


@dataclass
class Stored:
    type: str       # ggml type name
    rows: int
    cols: int
    data: np.ndarray   # uint8 [rows, row bytes], memory-mapped


def tensors_of(path, mode: str = "r") -> dict[str, Stored]:
    """{name: Stored} of a GGUF's 2-D tensors (the matrices), memory-mapped (mode "r+": writable in place)."""
    from gguf import GGML_QUANT_SIZES
    buf, start, infos = table(path, mode)
    out = {}
    for name, dims, ttype, offset in infos:
        if len(dims) != 2:
            continue
        block, size = GGML_QUANT_SIZES[ttype]
        cols, rows = int(dims[0]), int(dims[1])
        row_bytes = cols // block * size
        data = buf[start + offset:start + offset + rows * row_bytes].reshape(rows, row_bytes)
        out[name] = Stored(ttype.name, rows, cols, data)
    return out


def tensor_types(path) -> dict[str, str]:
    """{name: ggml type name} of every tensor of a GGUF."""
    return {name: ttype.name for name, _, ttype, _ in table(path)[2]}


def table(path, mode: str = "r"):
    """(memory map, data start, [(name, dims, type, offset)]): the GGUF's tensor table."""
    import struct
    from gguf import GGMLQuantizationType
    buf = np.memmap(path, mode=mode)
    mv = memoryview(buf)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", mv, 0)
    if magic != b"GGUF" or version < 2:
        raise UserError(f"{path} is not a GGUF v2+ file")
    off, align = 24, 32

    def string(off):
        (n,) = struct.unpack_from("<Q", mv, off)
        return bytes(mv[off + 8:off + 8 + n]).decode(), off + 8 + n

    def skip(vtype, off):
        if vtype == STRING:
            return off + 8 + struct.unpack_from("<Q", mv, off)[0]
        if vtype == ARRAY:
            etype, count = struct.unpack_from("<IQ", mv, off)
            off += 12
            if etype in _SCALAR:
                return off + count * _SCALAR[etype]
            for _ in range(count):
                off = skip(etype, off)
            return off
        return off + _SCALAR[vtype]

    for _ in range(n_kv):
        key, off = string(off)
        (vtype,) = struct.unpack_from("<I", mv, off)
        if key == "general.alignment":
            (align,) = struct.unpack_from("<I", mv, off + 4)
        off = skip(vtype, off + 4)
    infos = []
    for _ in range(n_tensors):
        name, off = string(off)
        (n_dims,) = struct.unpack_from("<I", mv, off)
        dims = struct.unpack_from(f"<{n_dims}Q", mv, off + 4)
        ttype, offset = struct.unpack_from("<IQ", mv, off + 4 + 8 * n_dims)
        off += 4 + 8 * n_dims + 12
        infos.append((name, dims, GGMLQuantizationType(ttype), offset))
    return buf, -(-off // align) * align, infos
