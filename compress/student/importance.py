"""Importance of layers, MLP channels, attention heads and hidden channels, from calibration activations.

    ids = calib_ids(tok, texts, tokens=2048)                 # [n, L] token ids
    depth = depth_scores(model, ids, "block_influence")      # [n_layers], higher = more important
    width = width_scores(model, ids)                         # {"mlp": [n_layers, I], "heads": ..., "hidden": [H]}

Depth (ShortGPT): block influence 1 - cos(layer input, layer output), or the measured increase of
calibration cross-entropy when the layer alone is skipped. Width (Minitron): mean |activation| of
the MLP's gate*up product (the down_proj input) per channel; per attention head, the mean norm of
what the head adds to the residual stream (its slice of the o_proj input through its o_proj
columns: exactly what removing the head takes away); per hidden channel, mean |activation| of every
RMSNorm output (the inputs of attention, MLP and lm_head), summed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .subset import block_influence, calibration_ids


def calib_ids(tok, texts: list[str], tokens: int, seq_len: int = 256) -> torch.Tensor:
    """[n, L] calibration ids, about `tokens` in all (L = min(seq_len, tokens))."""
    seq_len = max(16, min(seq_len, tokens))
    return calibration_ids(tok, texts, n_seqs=max(1, tokens // seq_len), seq_len=seq_len)


def depth_scores(model, ids: torch.Tensor, metric: str) -> list[float]:
    """Per decoder layer, how much the model needs it (higher = keep)."""
    if metric == "block_influence":
        return block_influence(model, ids.to(_device(model)))
    return loss_increase(model, ids)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def calib_loss(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy on ids [n, L], one row at a time (memory O(L * V))."""
    total, count = 0.0, 0
    for row in ids.to(_device(model)):
        logits = model(row[None], use_cache=False).logits[0, :-1].float()   # [L-1, V]
        total += float(F.cross_entropy(logits, row[1:], reduction="sum"))
        count += row.numel() - 1
    return total / count


@torch.no_grad()
def loss_increase(model, ids: torch.Tensor) -> list[float]:
    """Per layer: calibration CE with that layer skipped minus the full model's CE."""
    base = calib_loss(model, ids)
    scores = []
    for layer in model.model.layers:
        # The hook hands the layer's input on as its output: the residual stream skips the layer.
        hook = layer.register_forward_hook(
            lambda m, args, out: args[0] if torch.is_tensor(out) else (args[0], *out[1:]))
        try:
            scores.append(calib_loss(model, ids) - base)
        finally:
            hook.remove()
    return scores


def _attn_shape(model) -> tuple[int, int]:
    c = model.config
    heads = c.num_attention_heads
    return heads, getattr(c, "head_dim", None) or c.hidden_size // heads


@torch.no_grad()
def width_scores(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean activation magnitudes over all calibration tokens.

    Returns {"mlp": [n_layers, I], "heads": [n_layers, n_heads], "hidden": [H]} (float32, CPU).
    Measured on the model as it is (after any depth pruning), so the scores see the activations
    the remaining layers actually get.
    """
    layers = model.model.layers
    n_heads, d = _attn_shape(model)
    hidden = model.config.hidden_size
    mlp = torch.zeros(len(layers), model.config.intermediate_size)
    heads = torch.zeros(len(layers), n_heads)
    chan = torch.zeros(hidden)

    def on_down(i):
        def hook(m, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])             # [N, I] = act(gate) * up
            mlp[i] += x.abs().sum(0).cpu()
        return hook

    def on_o(i):
        def hook(m, args):
            x = args[0].float().reshape(-1, n_heads, d)                    # [N, heads, d]
            w = m.weight.float().view(m.out_features, n_heads, d)          # [H, heads, d]
            # per token and head: || W_o[:, head] @ x_head ||, the head's write to the residual
            contrib = torch.einsum("nhd,ehd->nhe", x, w)                   # [N, heads, H]
            heads[i] += contrib.norm(dim=-1).sum(0).cpu()
        return hook

    def on_norm(m, args, out):
        chan.add_(out.float().reshape(-1, hidden).abs().sum(0).cpu())      # [H]

    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_norm))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_norm))
    hooks.append(model.model.norm.register_forward_hook(on_norm))
    try:
        for row in ids.to(_device(model)):    # one sequence at a time keeps [N, heads, H] small
            model(row[None], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    n = ids.numel()
    return {"mlp": mlp / n, "heads": heads / n, "hidden": chan / n}


def group_scores(head_scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[n_layers, heads] -> [n_layers, kv_heads]: summed over the query heads sharing each KV head.

    HF's repeat_kv gives query head h the KV head h // (heads // kv_heads).
    """
    n_layers, n_heads = head_scores.shape
    return head_scores.view(n_layers, kv_heads, n_heads // kv_heads).sum(-1)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original layout)."""
    return torch.sort(torch.topk(scores, k).indices).values


def kept_share(scores: torch.Tensor, kept: torch.Tensor) -> float:
    """Fraction of the total importance mass the kept entries hold (1.0 = nothing of note removed)."""
    total = float(scores.sum())
    return float(scores[kept].sum()) / total if total > 0 else 1.0
