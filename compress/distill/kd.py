"""The memory-efficient distillation loss: logits are made and consumed a chunk of tokens at a time.

A seeds-style loop holds teacher and student logits for the whole micro-batch, [B, S, V] fp32
each, plus their softmaxes and gradients: with V = 151,936 that is 0.6 GB per 1k tokens per copy.
Here both models stop at their last hidden state ([B, S, H], H << V); the student's lm_head and
the loss run on `chunk` tokens at a time and each chunk is backpropagated at once into the hidden
state (whose gradient accumulates), so at most one [chunk, V] set of logits is alive. A final
backward from the hidden state through the student's body finishes the step. Loss and gradients
equal the unchunked computation (tests/test_kd.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import losses
from .spec import TEMPERED


@dataclass
class Teachers:
    """What the loss reads from the teacher side for one micro-batch.

    hidden: per teacher, last hidden states [B, S, H_t] (None when training from the cache);
    heads: their lm_heads; weights: the mixture weights; cached: (ids [B, S, K] int64,
    log-probs [B, S, K] float) from the top-k cache, else None.
    """
    hidden: list = field(default_factory=list)
    heads: list = field(default_factory=list)
    weights: list = field(default_factory=list)
    cached: tuple | None = None


def body_and_head(model):
    """(the decoder that returns last hidden states, the lm_head) of an HF causal LM."""
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def next_token_labels(ids):
    """[B, S] ids -> [B*S] labels: position s predicts ids[s+1]; each row's last position is ignored."""
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return labels.reshape(-1)


def chunked_loss_backward(h_s, head_s, teachers: Teachers, ids, terms: dict, T: float, vocab: int,
                          beta: float = 0.5, top_k: int = 64, proj=None, chunk: int = 256,
                          scale: float = 1.0) -> tuple[float, dict]:
    """Weighted distillation loss of one micro-batch, with its gradient already backpropagated.

    h_s: student last hidden states [B, S, H_s] (attached to the student's graph); head_s: its
    lm_head; ids: [B, S] token ids; terms: {name: weight} (spec.TERMS); T: temperature; vocab: the
    shared vocabulary size (logits beyond it, padding rows, are dropped); proj: Linear(H_s -> H_t)
    for hidden terms when widths differ; scale: multiplies loss and gradients (grad accumulation).
    KL-family terms average over all B*S positions, CE over the B*(S-1) that have a next token.
    Returns (loss value, {term: unweighted mean}).
    """
    B, S, _ = h_s.shape
    h = h_s.detach().reshape(B * S, -1).requires_grad_(True)          # [N, H_s]: gradient collects here
    labels = next_token_labels(ids)                                    # [N]
    n_all, n_ce = B * S, max(1, int((labels != -100).sum()))
    t_hidden = [t.reshape(B * S, -1) for t in teachers.hidden]         # [N, H_t] each
    cached = None if teachers.cached is None else tuple(c.reshape(B * S, -1) for c in teachers.cached)
    parts = {name: 0.0 for name in terms}
    total = 0.0
    logit_terms = [n for n in terms if n in TEMPERED or n in ("topk", "ce")]
    for lo in range(0, n_all if logit_terms else 0, chunk):
        sl = slice(lo, lo + chunk)
        z = head_s(h[sl])[:, :vocab].float()                           # [c, V] student logits
        vals = {}
        if any(n in TEMPERED for n in terms):
            s_logp_T = F.log_softmax(z / T, dim=-1)
            t_logp_T = teacher_logp(teachers, t_hidden, sl, vocab, T)
            for n in terms:
                if n in TEMPERED:
                    vals[n] = term(n, s_logp_T, t_logp_T, beta) * T * T
        if "topk" in terms:
            if cached is not None:
                t_idx, t_val = cached[0][sl], cached[1][sl].float()
            else:
                t_val, t_idx = teacher_logp(teachers, t_hidden, sl, vocab, 1.0).topk(top_k, dim=-1)
            vals["topk"] = losses.topk_kl(F.log_softmax(z, dim=-1), t_idx, t_val)
        if "ce" in terms:
            vals["ce"] = losses.token_ce(z, labels[sl])
        loss = sum(terms[n] * v.sum() / (n_ce if n == "ce" else n_all) for n, v in vals.items())
        (loss * scale).backward()                                      # frees this chunk's logits
        total += float(loss.detach())
        for n, v in vals.items():
            parts[n] += float(v.detach().sum()) / (n_ce if n == "ce" else n_all)
    hidden = {n: w for n, w in terms.items() if n.startswith("hidden_")}
    if hidden:
        hs = proj(h) if proj is not None else h
        loss = 0.0
        for n, w in hidden.items():
            v = getattr(losses, n)(hs, t_hidden[0].clone()).mean()     # the first teacher's; clone: out of inference mode
            loss = loss + w * v
            parts[n] = float(v.detach())
        (loss * scale).backward()
        total += float(loss.detach())
    if h.grad is not None:
        h_s.backward(h.grad.view_as(h_s))                              # through the student's body
    return total, parts


def teacher_logp(teachers: Teachers, t_hidden: list, sl: slice, vocab: int, T: float):
    """The teachers' mixture log-probs at temperature T for one chunk of tokens: [c, V]."""
    with torch.no_grad():
        logps = [F.log_softmax(head(h[sl])[:, :vocab].float() / T, dim=-1)
                 for head, h in zip(teachers.heads, t_hidden)]
        return losses.mix_teachers(logps, teachers.weights)


def term(name: str, s_logp, t_logp, beta: float):
    if name == "fkl":
        return losses.forward_kl(s_logp, t_logp)
    if name == "rkl":
        return losses.reverse_kl(s_logp, t_logp)
    if name == "jsd":
        return losses.generalized_jsd(s_logp, t_logp, beta)
    return losses.tvd(s_logp, t_logp)
