"""Quantize to ONNX INT8 or INT4 weights (onnxruntime's MatMulNBits), next to the fp32 ONNX export.

    from compress.quantize import onnx as quantize_onnx
    art = quantize_onnx.run(cfg, distilled, run_dir / "onnx-int4", qtype="int4", fp32=onnx_fp32)

The graph is the fp32 export's (same builder, same operators); the builder quantizes while it
writes, because only it knows that a tied embedding and the output layer are one matrix: at INT4
the token lookup (GatherBlockQuantized) and lm_head (MatMulNBits) then share one quantized copy,
where quantizing the fp32 file afterwards keeps an fp32 copy of the embedding for the lookup.

Both types quantize weights block-wise: each block of `block` input channels of every weight gets
its own scale. That is why INT8 keeps the fp32 model's quality where onnxruntime's dynamic INT8
(`quantize_dynamic`: one scale per tensor) does not: on the built-in teacher that raised held-out
perplexity by 68 %. MatMulNBits runs in onnxruntime's CPU, CUDA, WebGPU and WebAssembly providers,
so the same file serves apps and the browser.

The block size is the largest of BLOCKS that divides every weight's input width (SmolLM2's 576 is
not a multiple of 128), unless quantize.onnx_block sets it.
"""
from __future__ import annotations

from pathlib import Path

from .. import artifacts
from ..formats import FORMATS
from ..stage import stage
from ..errors import UserError, closest
from ..export.onnx import OUT_FILE, build, check_arch, graph_facts, require

TYPES = FORMATS["onnx"].quantize
BLOCKS = (128, 64, 32, 16)


# The builder's options per type, chosen by held-out quality on the built-in teacher (README):
# accuracy_level=4 computes with int8 activations (onnxruntime's fast CPU kernels: INT8 decodes at
# ~30 tok/s instead of ~1, with the same perplexity); INT4 keeps lm_head at 8 bits (rtn_last) and
# uses a zero point per block, which took distilled-student perplexity from +60 % to +24 % over fp32.
OPTIONS = {"int8": ["accuracy_level=4"],
           "int4": ["accuracy_level=4", "algo_config=rtn_last", "is_symmetric=false"]}
MAX_BLOCK = {"int8": 128, "int4": 32}   # smaller int4 blocks measured better; int8 has little to gain


@stage("quantize", inputs=("fp32",), reads=("quantize.onnx_block",), params=("qtype",), format="onnx",
       extra=lambda cfg, qtype: {"options": OPTIONS.get(qtype)})
def run(cfg, src, out, *, qtype: str, fp32=None) -> artifacts.Artifact:
    """HF artifact `src` -> `qtype` ONNX artifact at `out` (fp32: the export it sits beside)."""
    if qtype not in TYPES:
        raise UserError(f"unknown ONNX quantization '{qtype}'{closest(qtype, list(TYPES))}; "
                        f"quantize.onnx takes {', '.join(TYPES)}")
    builder = require("ONNX quantization")
    config = check_arch(src.path)
    widths = input_widths(config)
    block = cfg.quantize.onnx_block or pick_block(widths, MAX_BLOCK[qtype])
    bad = sorted(w for w in widths if w % block)
    if bad:
        raise UserError(f"quantize.onnx_block={block} does not divide the weight input widths {bad}; "
                        f"leave quantize.onnx_block unset to pick one that does")
    with artifacts.writing(out, quant=qtype, file=OUT_FILE) as (tmp, meta):
        build(builder, Path(src.path), tmp, qtype, [f"block_size={block}", *OPTIONS[qtype]],
              edit=half_embedding if qtype == "int8" else None)
        facts = graph_facts(tmp / OUT_FILE)
        meta["params"] = src.meta.get("params")
        meta["metrics"] = {**facts, "bits": TYPES[qtype].bits, "block": block,
                           "float_matmuls": facts["ops"].get("MatMul", 0)}
    return artifacts.load(out)


def input_widths(config: dict) -> set[int]:
    """Input widths of the quantized weights: hidden (q/k/v, gate/up, lm_head), attention output
    (o_proj) and the MLP width (down_proj)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return {config["hidden_size"], heads * head_dim, config["intermediate_size"]}


def pick_block(widths: set[int], largest: int = 128) -> int:
    for block in BLOCKS:
        if block <= largest and all(w % block == 0 for w in widths):
            return block
    raise UserError(f"no MatMulNBits block size in {BLOCKS} divides the widths {sorted(widths)}; "
                    f"prune or pick widths that are multiples of 16")


def half_embedding(model) -> None:
    """Store the token-embedding table in fp16 and cast the looked-up rows back to fp32 (in place).

    At INT8 the builder keeps an fp32 copy of a tied embedding for the lookup (its quantized lookup
    is 4-bit only); for SmolLM2 that copy is half the file. fp16 rows change the model by less than
    the INT8 weights do, and Gather + Cast run in every onnxruntime provider.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.op_type == "Gather" and node.input[0] in inits and node.name.endswith("embed_tokens/Gather"):
            table = inits[node.input[0]]
            if table.data_type != onnx.TensorProto.FLOAT:
                return
            table.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(table).astype(np.float16), table.name))
            rows = node.output[0]
            node.output[0] = rows + "/fp16"
            graph.node.insert(i + 1, helper.make_node("Cast", [rows + "/fp16"], [rows], name=node.name + "/Cast",
                                                      to=onnx.TensorProto.FLOAT))
            return
