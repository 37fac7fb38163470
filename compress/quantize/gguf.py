"""Quantize an F16 GGUF with llama.cpp's own quantizer (k-quants, legacy quants), optionally
guided by an importance matrix.

    from compress.quantize import gguf as quantize_gguf
    art = quantize_gguf.run(cfg, f16, run_dir / "gguf-Q4_K_M", qtype="Q4_K_M", imatrix=im)
    # -> gguf-Q4_K_M/model.gguf + Modelfile + quantize.log (llama.cpp's own report)

llama.cpp decides each tensor's type (k-quant mixes keep some tensors at higher precision; widths
not divisible by the block size fall back to another type). meta.metrics records what it chose.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from .. import artifacts
from ..stage import stage
from ..errors import UserError, closest
from ..formats import GGUF_QUANT as QUANTIZED
from .header import tensor_types

OUT_FILE = "model.gguf"
LOG_FILE = "quantize.log"


@stage("quantize", inputs=("imatrix",), params=("qtype",), format="gguf")
def run(cfg, src, out, *, qtype: str, imatrix=None) -> artifacts.Artifact:
    """F16/BF16/F32 GGUF artifact `src` -> `qtype` GGUF artifact at `out`."""
    if qtype not in QUANTIZED:
        raise UserError(f"unknown quantized GGUF type {qtype}{closest(qtype, QUANTIZED)}; "
                        f"supported: {', '.join(QUANTIZED)}")
    with artifacts.writing(out, quant=qtype, file=OUT_FILE) as (tmp, meta):
        matrix = dict(np.load(imatrix.file)) if imatrix is not None else None
        fallbacks = quantize(src.file, tmp / OUT_FILE, qtype, matrix, tmp / LOG_FILE)
        types = tensor_types(tmp / OUT_FILE)
        counts: dict[str, int] = {}
        for t in types.values():
            counts[t] = counts.get(t, 0) + 1
        modelfile(src, tmp)
        meta["params"] = src.meta.get("params")
        meta["metrics"] = {"tensor_types": counts, "tensors": types, "fallbacks": fallbacks,
                           "imatrix": imatrix is not None}
    return artifacts.load(out)


def quantize(src: Path, dst: Path, qtype: str, matrix: dict[str, np.ndarray] | None, log: Path,
             overrides: dict[str, str] | None = None) -> int:
    """Run llama_model_quantize; returns how many tensors llama.cpp had to give a fallback type.

    `overrides` {tensor name: ggml type name} sets those tensors' types (llama.cpp's --tensor-type);
    with it every other tensor gets `qtype`'s base type (--pure) instead of llama.cpp's mix.
    """
    import gguf
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[qtype].code
    params.nthread = os.cpu_count() or 1
    keep = []   # the C side only borrows these buffers: they must stay alive during the call
    if matrix:
        params.imatrix = _imatrix_entries(matrix, keep)
    if overrides:
        params.pure = True
        entries = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()   # zeroed: last one ends it
        for entry, (name, type_name) in zip(entries, overrides.items()):
            pattern = ("^" + re.escape(name) + "$").encode()    # a regex to llama.cpp: match this name only
            keep.append(pattern)
            entry.pattern = pattern
            entry.type = int(gguf.GGMLQuantizationType[type_name])
        keep.append(entries)
        params.tt_overrides = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    with _stderr_to(log):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = log.read_text(errors="replace")
    if rc != 0:
        errors = [ln for ln in text.splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        detail = (errors or text.strip().splitlines() or ["no log output"])[-1].strip()
        raise UserError(f"llama.cpp could not quantize {src.name} to {qtype}: {detail}")
    # llama.cpp's own count: "WARNING: N of M tensor(s) required fallback quantization".
    m = re.search(r"(\d+) of \d+ tensor\(s\) required fallback", text)
    return int(m.group(1)) if m else 0


def _imatrix_entries(matrix: dict[str, np.ndarray], keep: list):
    """A NULL-name-terminated C array of llama_model_imatrix_data {name, data, size}."""
    import llama_cpp
    entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()    # zeroed: last one ends it
    for entry, (name, values) in zip(entries, matrix.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)     # [in_features]
        name_b = name.encode()
        keep += [values, name_b]
        entry.name = name_b
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = values.size
    keep.append(entries)
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send llama.cpp's log (C stderr and llama-cpp-python's log callback) to a file.

    The callback prints to sys.stderr only at or above its logger's level, which Llama(verbose=False)
    raises to ERROR; we lower it for the call so the log is complete.
    """
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    sys.stderr.flush()
    saved_fd = os.dup(2)
    saved_py = sys.stderr
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = f
        logger.setLevel(logging.INFO)
        try:
            yield
        finally:
            f.flush()
            logger.setLevel(level)
            sys.stderr = saved_py
            os.dup2(saved_fd, 2)
            os.close(saved_fd)


def modelfile(src, tmp: Path) -> None:
    """The F16's Modelfile fits every quant of it; regenerate it if the F16 has none."""
    if (src.path / "Modelfile").is_file():
        shutil.copyfile(src.path / "Modelfile", tmp / "Modelfile")
    else:
        from ..export.modelfile import chat_info, write_modelfile
        write_modelfile(tmp, *chat_info(tmp / OUT_FILE))
