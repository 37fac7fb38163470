"""Quantize an HF artifact with bitsandbytes: LLM.int8() or 4-bit NormalFloat, for GPU servers.

    from compress.quantize import bnb
    art = bnb.run(cfg, distilled, run_dir / "bnb-nf4", qtype="nf4")
    # -> an HF directory whose config.json carries the quantization_config; transformers loads it
    #    quantized with AutoModelForCausalLM.from_pretrained(dir, device_map="cuda")

The weights are stored quantized (int8 rows with their scales; packed NF4 with per-block absmax),
so the directory is the size a server downloads. Linear layers are quantized; embeddings, norms and
the output layer stay in their original precision, as bitsandbytes does. Quantization runs on CUDA
when it is present and on CPU otherwise (bitsandbytes >= 0.45 has CPU kernels); the artifact is the
same either way and records where it was made.
"""
from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..formats import FORMATS
from ..stage import stage
from ..errors import UserError, closest

TYPES = tuple(FORMATS["bnb"].quantize)


def require():
    import logging
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("bitsandbytes quantization needs the optional package bitsandbytes; install it with: "
                        "pip install 'compress[bnb]'") from None
    # bitsandbytes logs, per call, that LLM.int8() casts fp32 inputs to fp16 and that an optional
    # CPU kernel package is absent: both are how it is meant to run here, not the user's problem.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def quant_config(qtype: str):
    import torch
    from transformers import BitsAndBytesConfig
    if qtype == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    # fp32 compute on CPU (no fast fp16 there); bf16 on GPU, the usual serving choice.
    compute = torch.bfloat16 if device() == "cuda" else torch.float32
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


@stage("quantize", params=("qtype",), format="hf")
def run(cfg, src, out, *, qtype: str) -> artifacts.Artifact:
    """HF artifact `src` -> bitsandbytes `qtype` HF artifact at `out`."""
    if qtype not in TYPES:
        raise UserError(f"unknown bitsandbytes type '{qtype}'{closest(qtype, list(TYPES))}; "
                        f"quantize.bnb takes {', '.join(TYPES)}")
    require()
    from transformers import AutoModelForCausalLM
    from ..models import check_local_arch, count_params, load_tokenizer, quiet_transformers
    check_local_arch(Path(src.path))
    quiet_transformers()
    where = device()
    model = AutoModelForCausalLM.from_pretrained(str(src.path), quantization_config=quant_config(qtype),
                                                 device_map=where, use_safetensors=True)
    tok = load_tokenizer(str(src.path))
    with artifacts.writing(out, quant=f"bnb-{qtype}") as (tmp, meta):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        meta["params"] = src.meta.get("params") or count_params(model)
        meta["metrics"] = {"quantized_on": where,
                           "linear_layers": sum(type(m).__name__ in ("Linear8bitLt", "Linear4bit")
                                                for m in model.modules())}
    return artifacts.load(out)
