"""Quantization-aware distillation into an ONNX INT4 file: the MatMulNBits blocks onnxruntime's
quantizer wrote, with their scales trained against the teacher, written back into a copy.

    compress run profile=browser qad.types=[int4]        # -> teacher-onnx-int4-qad, onnx-int4-qad
    from compress.quantize import qad_onnx
    art = qad_onnx.run(cfg, plain_int4, run_dir / "onnx-int4-qad", hf=distilled, teacher=teacher, data=data)

MatMulNBits stores W [N, K] as B uint8 [N, K / block, block / 2] (two 4-bit codes per byte, the
first in the low half), scales float32 [N, K / block] and zero points packed two per byte
[N, ceil(K / block / 2)]: w = scale * (code - zero point), which is d * q with the integer
q = code - zero point (tune.py's form). Codes and zero points stay; the float32 scales are trained
(qad.py says how) and the graph is written again with them, so the file onnxruntime, ORT GenAI and
transformers.js load holds exactly the trained values. The 8-bit lm_head / embedding lookup is kept.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from .. import artifacts
from ..errors import UserError
from ..stage import stage
from . import qad

OUT_FILE = "model.onnx"


@stage("qad", inputs=("hf", "teacher", "data"), reads=qad.READS, format="onnx")
def run(cfg, src, out, *, hf, teacher, data) -> artifacts.Artifact:
    """Plain INT4 ONNX artifact `src` (made from HF artifact `hf`) -> tuned INT4 ONNX at `out`."""
    import onnx
    from ..export.onnx import require, resave
    from ..models import load_tokenizer
    from .tune import attach
    require("ONNX quantization-aware distillation", builder=False)
    if src.meta.get("quant") != "int4" or src.meta.get("stage") != "quantize":
        raise UserError(f"ONNX quantization-aware distillation starts from a quantize.onnx=int4 file; "
                        f"{src.name} is {src.meta.get('quant') or 'not quantized'}")
    qad.check_budget(cfg.qad)
    qad.check_source(hf)
    target, model = qad.models_of(hf, teacher)
    mats = matmuls(onnx.load(str(src.file), load_external_data=True))
    plan = {name: hf_modules(model, name, m["N"]) for name, m in mats.items()
            if m["bits"] == 4 and name != "lm_head"}
    load_fixed(model, mats)
    layers = attach(model, module_blocks(mats, plan))
    seqs, check = qad.train_tokens(load_tokenizer(str(hf.path)), data, cfg.qad.tokens, cfg.qad.seq_len)
    with artifacts.writing(out, quant="int4", file=OUT_FILE) as (tmp, meta):
        history = qad.train(cfg, model, target, seqs, out, own_copy=hf.path == teacher.path)
        scales = {name: np.concatenate([layers[mod].stored()[0].detach().numpy() for mod, _ in mods])
                  for name, mods in plan.items()}
        for f in Path(src.path).iterdir():      # config, tokenizer, genai_config: as the plain artifact's
            if f.is_file() and f.name not in (OUT_FILE, OUT_FILE + "_data", artifacts.META):
                shutil.copy2(f, tmp / f.name)
        resave(Path(src.file), tmp / OUT_FILE, edit=lambda proto: set_scales(proto, mats, scales))
        checked = qad.check_files(target, check, Path(src.file), tmp / OUT_FILE, logprobs)
        shipped = "plain" if checked and checked["tuned_kld"] > checked["plain_kld"] else "tuned"
        if shipped == "plain":
            resave(Path(src.file), tmp / OUT_FILE)
        meta["params"] = src.meta.get("params")
        meta["metrics"] = {**{k: v for k, v in src.meta.get("metrics", {}).items() if k in ("bits", "block", "ops")},
                           "plain": src.name, "qtype": "int4", **qad.budget_of(cfg.qad, history, seqs),
                           "tuned_tensors": len(plan), "tuned_types": ["int4"],
                           "kept_tensors": {n: f"int{m['bits']}" for n, m in mats.items() if n not in plan},
                           "check": checked, "shipped": shipped, "device": history["device"]}
    qad.drop_checkpoints(out)
    return artifacts.load(out)


def matmuls(model) -> dict[str, dict]:
    """{weight name prefix: {N, K, bits, block, B, scales, zp (initializer names)}} of every MatMulNBits
    of an ONNX model (loaded with its external data)."""
    from onnx import helper
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        name = node.input[1].rsplit(".MatMul.", 1)[0]       # 'model.layers.0.attn.qkv_proj'
        zp = node.input[3] if len(node.input) > 3 and node.input[3] else None
        out[name] = {"N": attrs["N"], "K": attrs["K"], "bits": attrs["bits"], "block": attrs["block_size"],
                     "B": node.input[1], "scales": node.input[2], "zp": zp, "inits": inits}
    return out


def _init(m: dict, key: str) -> np.ndarray:
    """The array of MatMulNBits input `key` ("B", "scales", "zp") of `m`."""
    from onnx import numpy_helper
    return numpy_helper.to_array(m["inits"][m[key]])


def codes(m: dict) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 [N, blocks, block], scales float32 [N, blocks]) of a 4-bit MatMulNBits, q = code - zero point."""
    n, k, block = m["N"], m["K"], m["block"]
    nb = k // block
    packed = _init(m, "B").reshape(n, nb, block // 2)
    q = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(n, nb, block).astype(np.int16)
    if m["zp"]:
        z = _init(m, "zp").reshape(n, -1)
        z = np.stack([z & 0xF, z >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.int16)
    else:
        z = np.full((n, nb), 8, dtype=np.int16)             # symmetric: the default zero point
    d = _init(m, "scales").reshape(n, nb).astype(np.float32)
    return (q - z[..., None]).astype(np.int8), d


def module_blocks(mats: dict, plan: dict) -> dict[str, tuple]:
    """{HF module name: (q, d, None)}: each MatMulNBits weight's rows split among the HF modules it fuses."""
    out = {}
    for name, mods in plan.items():
        q, d = codes(mats[name])
        at = 0
        for mod, rows in mods:
            out[mod] = (q[at:at + rows], d[at:at + rows], None)
            at += rows
    return out


def hf_modules(model, name: str, rows: int) -> list[tuple[str, int]]:
    """[(HF linear module name, its rows)] a MatMulNBits weight holds, in row order: the builder
    fuses attention's q, k, v into one qkv_proj (and gate, up into gate_up_proj) where HF keeps them apart."""
    import torch
    layer, _, proj = name.rpartition(".")
    block = layer.replace(".attn", ".self_attn")
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for cand in ([f"{block}.{proj}"], [f"{block}.{p}" for p in fused.get(proj, ())]):
        try:
            mods = [(c, model.get_submodule(c)) for c in cand]
        except AttributeError:
            continue
        if mods and all(isinstance(m, torch.nn.Linear) for _, m in mods) \
                and sum(m.out_features for _, m in mods) == rows:
            return [(c, m.out_features) for c, m in mods]
    raise UserError(f"the ONNX weight {name} matches no linear layer of the HF model it was made from; "
                    f"tune a file quantize.onnx made from this model")


def load_fixed(model, mats: dict) -> None:
    """The quantized lm_head (and the tied embedding lookup sharing it) as the file holds it, so the
    torch model computes what onnxruntime will."""
    import torch
    m = mats.get("lm_head")
    if m is None:
        return
    if m["bits"] == 4:
        q, d = codes(m)
        w = q.astype(np.float32) * d[..., None]
    else:
        n, nb = m["N"], m["K"] // m["block"]
        q8 = _init(m, "B").reshape(n, nb, m["block"]).astype(np.float32)
        z = _init(m, "zp").reshape(n, nb).astype(np.float32) if m["zp"] else np.full((n, nb), 128.0)
        w = (q8 - z[..., None]) * _init(m, "scales").reshape(n, nb)[..., None]
    model.get_output_embeddings().weight.data.copy_(torch.from_numpy(w.reshape(m["N"], m["K"]).astype(np.float32)))


def set_scales(model, mats: dict, scales: dict[str, np.ndarray]) -> None:
    from onnx import numpy_helper
    by_name = {mats[n]["scales"]: s for n, s in scales.items()}
    for t in model.graph.initializer:
        if t.name in by_name:
            dtype = numpy_helper.to_array(t).dtype     # float32 on CPU builds, float16 where the builder chose it
            t.CopyFrom(numpy_helper.from_array(by_name[t.name].astype(dtype).reshape(tuple(t.dims)), t.name))


def logprobs(path: Path, ids: list[int]) -> np.ndarray:
    """[T, V] log-probs of an ONNX file in onnxruntime (the evaluate stage's runtime)."""
    import os
    from ..evaluate.runtimes import OnnxRuntime
    rt = OnnxRuntime(str(path), os.cpu_count() or 1, n_ctx=len(ids))
    try:
        return rt.logprobs(ids)
    finally:
        rt.close()
