"""How much each weight of a model matters to its output distribution: the statistics the auto GGUF
mix (quantize/mix.py) scores each candidate's rounding error with.

    from compress.quantize import sensitivity
    s = sensitivity.run(cfg, teacher, run_dir / "teacher-sensitivity", data=data)
    # -> sensitivity.npz: {"x/blk.0.attn_q.weight": [T, in], "d/blk.0.attn_q.weight": [T, out], ...}

A small change dW of a weight matrix W (y = W x) changes the model's next-token distribution by
KL ~= 1/2 dw^T F dw, F the Fisher information: the mean over tokens t of (d_t^T dW x_t)^2, where x_t
is the layer's input at token t and d_t the gradient of log p(y_t) with respect to the layer's output,
with y_t sampled from the model itself. The stage keeps x_t and d_t of SAMPLES tokens spread over
`quantize.mix_tokens` calibration tokens of the train split (one forward and backward pass), so
the mix stage evaluates that mean exactly for any candidate dW. The full form matters: its
diagonal (K-FAC: mean x_i^2 times mean d_j^2) treats rounding errors as independent, and misses by
orders of magnitude when they are not, e.g. when a distilled student's weights lie near the grid
of the quantized teacher they came from and a type rounds them back onto it, undoing the
distillation. The embedding table's rows are looked up, not multiplied: for them the diagonal
form is kept (row factor: each token's frequency in the calibration tokens; column factor: the
mean squared gradient at the embedding output). A tied output layer adds both terms to token_embd.weight.

Keys are GGUF tensor names and output rows follow the GGUF layout (Q/K rows permuted as the export
does). `check_ids` holds further train tokens on which the mix stage measures its KLD in llama.cpp.
"""
from __future__ import annotations

import numpy as np

from .. import artifacts
from ..stage import stage
from ..data import read_texts, token_stream
from ..errors import UserError

OUT_FILE = "sensitivity.npz"
CHUNK = 256     # tokens per forward/backward pass
SAMPLES = 128   # tokens whose layer inputs and output gradients are kept
CHECK = 512     # further train tokens the mix stage measures its KLD on


@stage("sensitivity", inputs=("data",), reads=("quantize.mix_tokens",), format="sensitivity")
def run(cfg, src, out, *, data) -> artifacts.Artifact:
    from ..models import load_model, load_tokenizer
    n_tokens = int(cfg.quantize.mix_tokens)
    model = load_model(str(src.path))
    stream = token_stream(load_tokenizer(str(src.path)), read_texts(data, "train"), limit=n_tokens + CHECK, eos=False)
    # The check tokens come after the calibration ones; a short train split gives them its last quarter.
    n = min(n_tokens, max(len(stream) - CHECK, len(stream) * 3 // 4))
    ids, check = stream[:n], stream[n:n + CHECK]
    if len(ids) < 2:
        raise UserError("the data has fewer than 2 calibration tokens; give data= with more text")
    with artifacts.writing(out, file=OUT_FILE) as (tmp, meta):
        stats = collect(model, ids)
        np.savez(tmp / OUT_FILE, check_ids=np.asarray(check, dtype=np.int32), **stats)
        meta["metrics"] = {"tokens": len(ids), "samples": int(min(SAMPLES, len(ids))), "check_tokens": len(check),
                           "tensors": sum(k.startswith("x/") and not k.endswith(":scale") for k in stats)}
    return artifacts.load(out)


def collect(model, ids: list[int], chunk: int = CHUNK, samples: int = SAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """{"x/<name>": inputs [T, in], "d/<name>": output gradients [T, out] (float16, GGUF row order),
    "embed_rows/token_embd.weight", "embed_cols/token_embd.weight"} over T sampled tokens."""
    import torch
    from ..export.gguf import arch_spec, gguf_name, permute_qk, tensor_name_map
    config = model.config
    names = tensor_name_map(config)
    embed = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embed.weight
    keep = np.unique(np.linspace(0, len(ids) - 1, min(samples, len(ids))).astype(int))
    xs: dict[str, list] = {}
    ds: dict[str, list] = {}
    embed_sq = []
    where = {}   # this chunk's positions to keep

    def linear_hook(name):
        def hook(_module, args, output):
            xs.setdefault(name, []).append(args[0].detach()[0, where["pos"]].float())
            output.register_hook(lambda g: ds.setdefault(name, []).append(g.detach()[0, where["pos"]].float()))
        return hook

    def embed_hook(_module, _args, output):
        output = output.detach().requires_grad_()   # the graph starts here: no weight needs a gradient
        output.register_hook(lambda g: embed_sq.append((g.detach()[0].double() ** 2).sum(0)))
        return output

    handles = [embed.register_forward_hook(embed_hook)]
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            # A tied lm_head is stored as token_embd.weight, the name llama.cpp quantizes it under.
            name = "token_embd.weight" if tied and module.weight is embed.weight else gguf_name(names, mod_name + ".weight")
            handles.append(module.register_forward_hook(linear_hook(name)))
    gen = torch.Generator().manual_seed(seed)
    params = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            where["pos"] = torch.as_tensor(keep[(keep >= start) & (keep < start + len(part))] - start)
            logp = torch.log_softmax(model(torch.tensor([part])).logits.float(), -1)[0]    # [T, V]
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)             # labels from the model itself
            (-logp.gather(1, y).sum()).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    spec = arch_spec(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    out = {}
    for name in xs:
        d = torch.cat(ds[name]).numpy()     # [T, out]; the backward visits layers in reverse, chunks in order
        if spec.permute_qk and ".attn_q." in name:
            d = permute_qk(d.T, n_head).T
        elif spec.permute_qk and ".attn_k." in name:
            d = permute_qk(d.T, n_kv).T
        _half(out, f"x/{name}", torch.cat(xs[name]).numpy())
        _half(out, f"d/{name}", d)
    n = len(ids)
    counts = np.bincount(np.asarray(ids), minlength=embed.weight.shape[0]).astype(np.float64)
    out["embed_rows/token_embd.weight"] = (counts / n).astype(np.float32)
    out["embed_cols/token_embd.weight"] = (sum(embed_sq) / n).float().numpy()
    return out


def _half(out: dict, key: str, a: np.ndarray) -> None:
    """Store `a` as float16 scaled to at most 1 in magnitude (gradients are far below float16's
    smallest normal number), with its scale beside it in float32."""
    scale = np.float32(np.abs(a).max() or 1.0)
    out[key] = (a / scale).astype(np.float16)
    out[key + ":scale"] = np.array(scale, dtype=np.float32)


def samples_of(stats, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(inputs [T, in], output gradients [T, out]) as float32, or None for a tensor with none."""
    if f"x/{name}" not in stats:
        return None
    return tuple(stats[k].astype(np.float32) * stats[k + ":scale"] for k in (f"x/{name}", f"d/{name}"))


def lookup_factors(stats, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(row factor, column factor) of an embedding table's lookups, or None."""
    if f"embed_rows/{name}" not in stats:
        return None
    return stats[f"embed_rows/{name}"], stats[f"embed_cols/{name}"]
