"""Export an HF artifact to an fp32 ONNX decoder with a KV cache, for onnxruntime, ORT GenAI and the
browser (transformers.js / onnxruntime-web).

    from compress.export import onnx as export_onnx
    art = export_onnx.run(cfg, distilled, run_dir / "onnx-fp32", teacher=teacher)
    # -> onnx-fp32/model.onnx + model.onnx_data + config.json + tokenizer files + genai_config.json

The graph comes from onnxruntime-genai's model builder, which writes the on-device LLM graph that
ONNX Runtime ships for Llama/Qwen families (fused GroupQueryAttention with past/present KV inputs,
RoPE caches, skip-RMSNorm). Why not optimum's exporter: optimum-onnx requires transformers < 4.58,
and compress keeps transformers current. Why not torch.onnx: it traces the HF cache classes, which
change between transformers releases, into a graph no runtime has tuned kernels for.

Inputs: input_ids [B, S] int64, attention_mask [B, P+S] int64, past_key_values.{i}.{key,value}
[B, kv_heads, P, head_dim]; outputs: logits [B, S, V], present.{i}.{key,value} [B, kv_heads, P+S,
head_dim]. Weights live in one external file `<model file>_data`, the name transformers.js loads.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from .. import artifacts
from ..formats import FORMATS
from ..stage import stage
from ..errors import UserError

OUT_FILE = "model.onnx"
LOG_FILE = "export.log"
# HF files the browser runtime and tokenizers read next to the graph.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")
PRECISIONS = tuple(FORMATS["onnx"].export)   # fp32 only: see formats.py


def require(what: str = "ONNX export", builder: bool = True):
    """Import the optional ONNX stack (the model builder only when exporting) or stop with the
    install line. The runtime alone imports onnxruntime and nothing heavier."""
    try:
        import onnx                       # noqa: F401
        import onnxruntime                # noqa: F401
        if builder:
            import onnxruntime_genai.models.builder as model_builder
            return model_builder
    except ImportError as e:
        raise UserError(f"{what} needs the optional ONNX packages ({e.name} is missing); "
                        f"install them with: pip install 'compress[onnx]'") from None
    return None


def check_arch(path: Path) -> dict:
    from ..archs import ARCHS
    from ..models import check_local_arch
    config = check_local_arch(Path(path))
    mt = config.get("model_type")
    if not ARCHS[mt].onnx:
        onnx = ", ".join(k for k, a in ARCHS.items() if a.onnx)
        raise UserError(f"ONNX export supports {onnx}, not '{mt}'; "
                        f"drop export.onnx or use GGUF (export.gguf) for this model")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 16:   # onnxruntime's GroupQueryAttention kernel requires it
        raise UserError(f"ONNX export needs an attention head size that is a multiple of 16, and "
                        f"{path} has {head_dim}; keep heads so that hidden/heads is a multiple of 16, "
                        f"or use GGUF (export.gguf) for this model")
    return config


@stage("export", inputs=("teacher",), reads=("export.onnx",), format="onnx")
def run(cfg, src, out, *, teacher=None) -> artifacts.Artifact:
    """HF artifact `src` -> fp32 ONNX artifact at `out`."""
    precision = str(cfg.export.onnx)
    if precision not in PRECISIONS:
        raise UserError(f"export.onnx={precision} is not supported; use export.onnx=fp32 "
                        f"(int8/int4 go in quantize.onnx)")
    builder = require()
    check_arch(src.path)
    with artifacts.writing(out, quant=precision, file=OUT_FILE) as (tmp, meta):
        build(builder, Path(src.path), tmp, precision)
        meta["params"] = src.meta.get("params")
        meta["metrics"] = graph_facts(tmp / OUT_FILE)
    return artifacts.load(out)


def build(builder, src: Path, dst: Path, precision: str, options: list[str] = (), edit=None) -> None:
    """Run the model builder into `dst`, then store the weights as `model.onnx_data`.

    `options` are the builder's KEY=VALUE extra options (block_size=32, accuracy_level=0, ...);
    `edit(model)`, when given, changes the graph in memory before the one save.
    """
    import logging
    work = dst / ".build"
    # The builder prints per-tensor progress and its quantizer logs every node (errors included for
    # nodes it skips by design): the files are checked after the build, so the terminal stays quiet.
    logging.disable(logging.ERROR)
    try:
        with open(dst / LOG_FILE, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            args = (None, str(src), str(work), precision, "cpu", str(work / "cache"))
            builder.create_model(*args, **builder.parse_extra_options(*args, list(options)))
    finally:
        logging.disable(logging.NOTSET)
    head_size = json.loads((work / "genai_config.json").read_text())["model"]["decoder"]["head_size"]

    def edits(model):
        fix_kv_dims(model, head_size)
        if edit is not None:
            edit(model)
    resave(work / OUT_FILE, dst / OUT_FILE, edits)
    for name in SIDE_FILES:                  # the HF originals, not the builder's rewritten copies
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    shutil.copy2(work / "genai_config.json", dst / "genai_config.json")
    shutil.rmtree(work)


def resave(src: Path, dst: Path, edit=None) -> None:
    """Copy an ONNX model with its weights in one external file named `<dst name>_data`
    (after `edit(model)` when given).

    The location is written into the graph, so renaming a model means re-saving it.
    """
    import onnx
    model = onnx.load(str(src), load_external_data=True)
    if edit is not None:
        edit(model)
    data = dst.name + "_data"
    (dst.parent / data).unlink(missing_ok=True)   # save_model appends to an existing data file
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)


def fix_kv_dims(model, head_size: int) -> None:
    """State the head size in the KV-cache inputs' and outputs' shapes.

    The builder leaves it symbolic ('kv_cache_dim'); runtimes that size the empty first-step cache
    from the graph's declared shapes (transformers.js) would make it 0 wide.
    """
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.startswith(("past_key_values.", "present.")):
            dim = value.type.tensor_type.shape.dim[3]
            dim.Clear()
            dim.dim_value = head_size


def graph_facts(path: Path) -> dict:
    """What a deployer checks: opset, operator counts, KV layout, vocabulary."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    past = [i for i in model.graph.input if i.name.startswith("past_key_values.")]
    logits = next(o for o in model.graph.output if o.name == "logits")
    return {"opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
            "ops": dict(sorted(ops.items())), "layers": len(past) // 2,
            "vocab": logits.type.tensor_type.shape.dim[-1].dim_value}


def genai_config(path: Path) -> dict:
    """The decoder facts the runtime needs (head size, KV heads, layers, context)."""
    try:
        return json.loads((Path(path) / "genai_config.json").read_text())["model"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{path} has no readable genai_config.json ({e}); re-run the ONNX export stage") from None
