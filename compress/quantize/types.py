"""The GGUF types compress can build, as data: name -> llama.cpp `llama_ftype` value.

Values are from llama.h (enum llama_ftype); the unquantized ones are written by export/gguf.py,
the rest by llama.cpp's own quantizer (quantize/gguf.py).
"""
from ..errors import UserError, closest

UNQUANTIZED = {"F32": 0, "F16": 1, "BF16": 32}
QUANTIZED = {
    "Q8_0": 7,
    "Q6_K": 18,
    "Q5_K_M": 17,
    "Q5_0": 8,
    "Q4_K_M": 15,
    "Q4_K_S": 14,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q3_K_M": 12,
    "Q2_K": 10,
}
GGUF_TYPES = {**UNQUANTIZED, **QUANTIZED}


def check_gguf_types(names, key: str) -> None:
    for n in names:
        if str(n) not in GGUF_TYPES:
            raise UserError(f"unknown GGUF type {key}={n}{closest(n, GGUF_TYPES)}; "
                            f"supported: {', '.join(GGUF_TYPES)}")
