"""How much each weight of a model matters to its output distribution: the statistics the auto GGUF
mix (quantize/mix.py) scores each tensor's rounding error with.

    from compress.quantize import sensitivity
    s = sensitivity.run(cfg, teacher, run_dir / "teacher-sensitivity", data=data)
    # -> sensitivity.npz: {"rows/blk.0.attn_q.weight": float32[out], "cols/blk.0.attn_q.weight": float32[in], ...}

A small change dW of a weight matrix W (y = W x) changes the model's next-token distribution by
KL ~= 1/2 sum_ji F_ji dW_ji^2, with F the Fisher information of the weights (diagonal part). For a
linear layer the Fisher factorises approximately (K-FAC) into the mean square of the layer's input
x_i (what llama.cpp's importance matrix holds) times the mean square of the gradient of log p(y)
with respect to the layer's output y_j, with y sampled from the model itself. Both are measured in
one forward and backward pass over calibration tokens from the train split. The embedding table's
rows are looked up, not multiplied: its row factor is each token's frequency in the calibration
tokens (smoothed, so unseen tokens still count) and its column factor the gradient at its output.
A tied output layer adds both terms to token_embd.weight, the one tensor llama.cpp stores for both.

Keys are GGUF tensor names and rows follow the GGUF layout (Q/K rows permuted as the export does).
"""
from __future__ import annotations

import numpy as np

from .. import artifacts
from ..stage import stage
from ..data import read_texts
from ..errors import UserError
from ..data import token_stream

OUT_FILE = "sensitivity.npz"
CHUNK = 256     # tokens per forward/backward pass
CHECK = 512     # further train tokens the mix stage measures its predicted KLD on


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
        meta["metrics"] = {"tokens": len(ids), "check_tokens": len(check),
                           "tensors": sum(k.startswith("rows/") for k in stats)}
    return artifacts.load(out)


def collect(model, ids: list[int], chunk: int = CHUNK, seed: int = 0) -> dict[str, np.ndarray]:
    """{"rows/<gguf name>": mean sq. output gradient [out], "cols/<gguf name>": mean sq. input [in]}."""
    import torch
    from ..export.gguf import arch_spec, gguf_name, permute_qk, tensor_name_map
    config = model.config
    names = tensor_name_map(config)
    embed = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embed.weight
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}

    def add(d, name, x):
        d[name] = d.get(name, 0) + (x.detach().reshape(-1, x.shape[-1]).double() ** 2).sum(0)

    def linear_hook(name):
        def hook(_module, args, output):
            add(cols, name, args[0])
            output.register_hook(lambda g: add(rows, name, g))
        return hook

    def embed_hook(_module, _args, output):
        output = output.detach().requires_grad_()   # the graph starts here: no weight needs a gradient
        output.register_hook(lambda g: add(cols, "embed", g))
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
            x = torch.tensor([ids[start:start + chunk]])
            logp = torch.log_softmax(model(x).logits.float(), -1)[0]             # [T, V]
            y = torch.multinomial(logp.detach().exp(), 1, generator=gen)        # labels from the model itself
            (-logp.gather(1, y).sum()).backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), params):
            p.requires_grad_(flag)
    n = len(ids)
    out = {}
    spec = arch_spec(config)
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    for name, r in rows.items():
        r = (r / n).float().numpy()
        if spec.permute_qk and ".attn_q." in name:
            r = permute_qk(r, n_head)
        elif spec.permute_qk and ".attn_k." in name:
            r = permute_qk(r, n_kv)
        out[f"rows/{name}"] = r
        out[f"cols/{name}"] = (cols[name] / n).float().numpy()
    counts = np.bincount(np.asarray(ids), minlength=embed.weight.shape[0]).astype(np.float64)
    vocab = counts.size
    out["embed_rows/token_embd.weight"] = ((counts + 0.5) / (n + 0.5 * vocab)).astype(np.float32)
    out["embed_cols/token_embd.weight"] = (cols["embed"] / n).float().numpy()
    return out


def tensor_factors(stats, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (row factor, column factor) pairs whose outer product weighs `name`'s squared errors."""
    pairs = []
    if f"rows/{name}" in stats:
        pairs.append((stats[f"rows/{name}"], stats[f"cols/{name}"]))
    if f"embed_rows/{name}" in stats:
        pairs.append((stats[f"embed_rows/{name}"], stats[f"embed_cols/{name}"]))
    return pairs
