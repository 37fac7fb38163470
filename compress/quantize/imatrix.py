"""Importance matrix for llama.cpp's quantizer, measured on the calibration (training) texts.

    from compress.quantize import imatrix
    im = imatrix.run(cfg, distilled, run_dir / "imatrix", data=data)
    # -> imatrix/imatrix.npz: {"blk.0.attn_q.weight": float32[in_features], ...}

For every matrix multiply, llama.cpp's imatrix tool collects the mean of x^2 over tokens for each
input column of the weight; the quantizer then weighs its rounding error per column by it, so
columns that carry large activations are kept more precisely. We collect the same statistic from
the HF model the F16 GGUF was exported from, with forward hooks on every nn.Linear, keyed by the
tensor names the export stage writes.
"""
from __future__ import annotations

import numpy as np

from .. import artifacts
from ..stage import stage
from ..data import read_texts, token_stream
from ..errors import UserError

OUT_FILE = "imatrix.npz"
CHUNK = 256     # tokens per forward pass, like llama.cpp's imatrix chunks


@stage("imatrix", inputs=("data",), reads=("quantize.imatrix_tokens",), format="imatrix")
def run(cfg, src, out, *, data) -> artifacts.Artifact:
    from ..models import load_model, load_tokenizer
    n_tokens = int(cfg.quantize.imatrix_tokens)
    if n_tokens < 1:
        raise UserError("quantize.imatrix_tokens must be >= 1, e.g. quantize.imatrix_tokens=4096")
    model = load_model(str(src.path))
    tok = load_tokenizer(str(src.path))
    ids = calibration_ids(tok, read_texts(data, "train"), n_tokens)
    with artifacts.writing(out, file=OUT_FILE) as (tmp, meta):
        matrix = collect(model, ids)
        np.savez(tmp / OUT_FILE, **matrix)
        meta["metrics"] = {"tokens": len(ids), "tensors": len(matrix)}
    return artifacts.load(out)


def calibration_ids(tok, texts: list[str], n_tokens: int) -> list[int]:
    """The first n_tokens token ids of the calibration texts, concatenated in order."""
    ids = token_stream(tok, texts, limit=n_tokens, eos=False)
    if not ids:
        raise UserError("the data has no text to calibrate the importance matrix on; give data= with some text")
    return ids[:n_tokens]


def collect(model, ids: list[int], chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean over tokens of x^2 per input column [in_features]} for every nn.Linear."""
    import torch
    from ..export.gguf import gguf_name, tensor_name_map
    names = tensor_name_map(model.config)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()   # [tokens, in_features]
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = []
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hf_name = mod_name + ".weight"
            if tied and module.weight is model.get_input_embeddings().weight:
                # Tied output layer: llama.cpp multiplies by token_embd.weight, so that is the name it
                # looks the statistics up under.
                name = "token_embd.weight"
            else:
                name = gguf_name(names, hf_name)
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            for start in range(0, len(ids), chunk):
                model(torch.tensor([ids[start:start + chunk]]))
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}
