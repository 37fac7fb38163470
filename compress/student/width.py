"""Width pruning of the decoders in compress/archs.py by slicing weights, in place; the config follows.

    keep_mlp(model, [idx_layer0, idx_layer1, ...])     # intermediate channels kept per layer
    keep_kv_groups(model, [groups_layer0, ...])        # KV heads kept per layer, with their query heads
    keep_hidden(model, idx)                            # residual-stream channels kept everywhere

Every layer keeps the same number of channels/heads (the HF config has one size per kind), but
which ones are kept is decided per layer. Index tensors are ascending, so keeping everything
reproduces the original weights bit for bit. head_dim never changes; config.head_dim is written
explicitly because hidden_size / num_attention_heads no longer gives it after pruning.
Weight layouts (nn.Linear stores [out, in]):
    q_proj [heads*d, H]   k_proj, v_proj [kv*d, H]   o_proj [H, heads*d]
    gate_proj, up_proj [I, H]   down_proj [H, I]   embed_tokens [V, H]   norms [H]
    Phi-3 fuses them: qkv_proj [heads*d + 2*kv*d, H] (q, k, v rows in that order), gate_up_proj [2*I, H].
    Per-head q/k norms (Qwen3, Gemma 3) are [d], shared by the heads: no head pruning touches them.
"""
from __future__ import annotations

import torch
from torch import nn


def _param(x: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(x.contiguous(), requires_grad=like.requires_grad)


def slice_linear(lin: nn.Linear, out_idx: torch.Tensor | None = None,
                 in_idx: torch.Tensor | None = None) -> None:
    """Keep rows `out_idx` and columns `in_idx` of lin.weight (and the matching bias entries)."""
    w = lin.weight.data
    if out_idx is not None:
        w = w.index_select(0, out_idx.to(w.device))
        if lin.bias is not None:
            lin.bias = _param(lin.bias.data.index_select(0, out_idx.to(w.device)), lin.bias)
    if in_idx is not None:
        w = w.index_select(1, in_idx.to(w.device))
    lin.weight = _param(w, lin.weight)
    lin.out_features, lin.in_features = w.shape


def head_rows(heads: torch.Tensor, d: int) -> torch.Tensor:
    """Head indices -> the rows (or columns) of their head_dim-sized slices: [len(heads) * d]."""
    return (heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def keep_mlp(model, kept: list[torch.Tensor]) -> None:
    """kept[i]: intermediate channels of layer i to keep (same count in every layer)."""
    for layer, idx in zip(model.model.layers, kept):
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):   # fused: the same channels of both halves
            half = mlp.gate_up_proj.out_features // 2
            slice_linear(mlp.gate_up_proj, out_idx=torch.cat([idx, idx + half]))
        else:
            slice_linear(mlp.gate_proj, out_idx=idx)
            slice_linear(mlp.up_proj, out_idx=idx)
        slice_linear(mlp.down_proj, in_idx=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    model.config.intermediate_size = len(kept[0])


def keep_kv_groups(model, kept: list[torch.Tensor]) -> None:
    """kept[i]: KV heads of layer i to keep; each keeps all the query heads that read it (GQA)."""
    c = model.config
    d = _head_dim(c)
    group = c.num_attention_heads // c.num_key_value_heads       # query heads per KV head
    for layer, groups in zip(model.model.layers, kept):
        attn = layer.self_attn
        q_heads = (groups[:, None] * group + torch.arange(group)[None, :]).reshape(-1)
        if hasattr(attn, "qkv_proj"):      # fused: q rows, then k rows, then v rows
            q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
            rows = torch.cat([head_rows(q_heads, d), q + head_rows(groups, d), q + kv + head_rows(groups, d)])
            slice_linear(attn.qkv_proj, out_idx=rows)
        else:
            slice_linear(attn.q_proj, out_idx=head_rows(q_heads, d))
            slice_linear(attn.k_proj, out_idx=head_rows(groups, d))
            slice_linear(attn.v_proj, out_idx=head_rows(groups, d))
        slice_linear(attn.o_proj, in_idx=head_rows(q_heads, d))
        if hasattr(attn, "num_key_value_heads"):   # Phi-3 splits its fused rows by these
            attn.num_key_value_heads = len(groups)
    c.head_dim = d
    c.num_key_value_heads = len(kept[0])
    c.num_attention_heads = len(kept[0]) * group


def keep_hidden(model, idx: torch.Tensor) -> None:
    """Keep residual-stream channels `idx` in embeddings, lm_head, every norm and projection."""
    c = model.config
    c.head_dim = _head_dim(c)           # fixed before hidden_size changes
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    emb.weight = _param(emb.weight.data.index_select(1, idx), emb.weight)   # [V, H']
    emb.embedding_dim = len(idx)
    if tied:
        out.weight = emb.weight         # one tensor again, as tie_word_embeddings expects
        out.in_features = len(idx)
    elif out is not None:
        slice_linear(out, in_idx=idx)
    for norm in _norms(model):
        norm.weight = _param(norm.weight.data.index_select(0, idx), norm.weight)
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        readers = [getattr(x, n) for x, names in ((a, ("q_proj", "k_proj", "v_proj", "qkv_proj")),
                                                  (m, ("gate_proj", "up_proj", "gate_up_proj")))
                   for n in names if hasattr(x, n)]
        for lin in readers:
            slice_linear(lin, in_idx=idx)           # read from the residual stream
        for lin in (a.o_proj, m.down_proj):
            slice_linear(lin, out_idx=idx)          # write to it (bias too, when present)
        if hasattr(m, "hidden_size"):
            m.hidden_size = len(idx)
    c.hidden_size = len(idx)


# Every [H] norm of a layer, Gemma 3's before and after the MLP included.
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _norms(model) -> list[nn.Module]:
    out = [model.model.norm]
    for layer in model.model.layers:
        out += [getattr(layer, n) for n in LAYER_NORMS if hasattr(layer, n)]
    return out
