"""The output formats compress ships: one row per format, read by every stage that needs them.

    compress ls formats

A row says which types the format has (with bits per weight), which runtime runs it, which
modules export and quantize it, how a user runs the shipped file, and where the report lists it.
Config choices, `compress ls formats`, preflight's disk estimate, evaluate's runtime check and the
report's order and run commands read this table. A new format is a row, its modules
(export/<name>.py and/or quantize/<name>.py, each a declared stage), its branch in pipeline.ship,
its `export.<name>` / `quantize.<name>` keys in config.py and its line in preflight.knobs_of.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Type:
    bits: float                  # bits per quantized weight as the format stores it, block scales included
    code: int | None = None      # the runtime's own id for the type (llama.cpp's llama_ftype)
    shipped: float | None = None  # bits per model weight of the whole file, when more than `bits` (upper bound)

    @property
    def shipped_bits(self) -> float:
        return self.shipped or self.bits


@dataclass(frozen=True)
class Format:
    name: str                  # the key under export.* and quantize.*: export.gguf, quantize.onnx, ...
    artifact: str              # meta["format"] of its artifacts (bitsandbytes files are HF directories)
    runtime: str               # what evaluates the artifact, and what the user ships it with
    export: dict               # export.<name> type -> Type: what the export stage writes
    quantize: dict             # quantize.<name> type -> Type: what the quantize stage makes
    export_module: str | None  # compress.export.<name>: its run() is the export stage
    quantize_module: str       # compress.quantize.<name>: its run() is the quantize stage
    order: int                 # report order among model artifacts (HF stages first)
    commands: dict = field(default_factory=dict)   # how to run it: {label: template} (report.build)


# The GGUF types compress builds. code: llama.h's enum llama_ftype. Bits: block bytes * 8 / weights
# per block (Q8_0: 34 B per 32 weights); the k-quant mixes (_M, _S) as llama.cpp reports them for
# whole models. export/gguf.py writes the unquantized ones, llama.cpp's quantizer the rest.
GGUF_EXPORT = {"F16": Type(16, 1), "BF16": Type(16, 32), "F32": Type(32, 0)}
GGUF_QUANT = {
    "Q8_0": Type(8.5, 7), "Q6_K": Type(6.56, 18), "Q5_K_M": Type(5.7, 17), "Q5_0": Type(5.5, 8),
    "Q4_K_M": Type(4.9, 15), "Q4_K_S": Type(4.6, 14), "Q4_0": Type(4.5, 2), "Q4_1": Type(5.0, 3),
    "Q3_K_M": Type(3.9, 12), "Q2_K": Type(3.4, 10),
}

# A size target instead of a type: llama.cpp types chosen per tensor to fit it (quantize/mix.py).
AUTO_RE = re.compile(r"auto(?::(\d+(?:\.\d+)?)(MB|%))?$")


def size_target(q) -> tuple[float | None, str | None] | None:
    """'auto' -> (None, None) (the profile's budget); 'auto:80MB' -> (80, 'MB'); 'auto:30%' -> (30, '%');
    None for a type name. A size at or below 0, or a percentage above 100, is a UserError."""
    from .errors import UserError
    m = AUTO_RE.match(str(q))
    if not m:
        return None
    if not m.group(1):
        return None, None
    value, unit = float(m.group(1)), m.group(2)
    if value <= 0 or (unit == "%" and value > 100):
        raise UserError(f"quantize.gguf={q}: a size target is above 0 MB, or a percentage in (0, 100]")
    return value, unit

FORMATS = {
    "gguf": Format(
        "gguf", "gguf", "llama.cpp", GGUF_EXPORT, GGUF_QUANT, "compress.export.gguf", "compress.quantize.gguf",
        order=2, commands={"llama_cpp": "llama-cli -m {main} -t {threads} -cnv",
                           "ollama": "ollama create {tag} -f {modelfile}"}),
    # fp16/bf16 graphs of the onnxruntime-genai builder target CUDA/DML, not the CPU provider.
    # INT8/INT4 are MatMulNBits weight-only; the file keeps fp16 embeddings and an 8-bit lm_head.
    "onnx": Format(
        "onnx", "onnx", "onnxruntime", {"fp32": Type(32)}, {"int8": Type(8, shipped=13), "int4": Type(4, shipped=5)},
        "compress.export.onnx", "compress.quantize.onnx", order=1,
        commands={"onnxruntime_genai": "python -c \"import onnxruntime_genai as og; m = og.Model({dir!r})\"",
                  "onnxruntime": "python -c \"import onnxruntime as ort; s = ort.InferenceSession({main_str!r})\""}),
    # bitsandbytes LLM.int8() and NF4 HF directories, for GPU servers (torch + CUDA).
    "bnb": Format(
        "bnb", "hf", "torch", {}, {"int8": Type(8, shipped=13), "nf4": Type(4, shipped=6)}, None, "compress.quantize.bnb",
        order=0),
}
# What evaluates each artifact format, and its place in the report. HF directories (the teacher,
# students, bitsandbytes files) run in torch and come first.
RUNTIMES = {"hf": "torch", **{f.artifact: f.runtime for f in FORMATS.values() if f.artifact != "hf"}}
ORDER = {"hf": 0, **{f.artifact: f.order for f in FORMATS.values() if f.artifact != "hf"}}
HF_COMMAND = ("python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
              "m = AutoModelForCausalLM.from_pretrained({dir!r}); t = AutoTokenizer.from_pretrained({dir!r})\"")
# Layouts re-arrange finished artifacts for one app (export.layout); they are not model formats.
LAYOUTS = ("transformers.js",)


def export_types(name: str) -> tuple:
    return tuple(FORMATS[name].export)


def quant_types(name: str) -> tuple:
    return tuple(FORMATS[name].quantize)


def bits(name: str, qtype: str, default: float = 16) -> float:
    """Shipped bits per weight of a type of format `name` (preflight's disk estimate)."""
    f = FORMATS[name]
    t = f.export.get(qtype) or f.quantize.get(qtype)
    return t.shipped_bits if t else default
