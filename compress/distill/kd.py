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

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from . import losses
from .spec import TERMS

# The per-token terms are computed in this order of kinds (spec.Term.teacher): the sum, and so the
# numbers, do not depend on the order distill.loss lists the terms in.
PER_TOKEN = ("dist", "topk", None)


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
    norm = {n: n_ce if TERMS[n].teacher is None else n_all for n in terms}
    flat = replace(teachers, hidden=[t.reshape(B * S, -1) for t in teachers.hidden],          # [N, H_t] each
                   cached=None if teachers.cached is None else tuple(c.reshape(B * S, -1) for c in teachers.cached))
    per_token = [n for kind in PER_TOKEN for n in terms if TERMS[n].teacher == kind]
    kinds = {TERMS[n].teacher for n in per_token}
    parts = {name: 0.0 for name in terms}
    total = 0.0
    for lo in range(0, n_all if per_token else 0, chunk):
        sl = slice(lo, lo + chunk)
        z = head_s(h[sl])[:, :vocab].float()                           # [c, V] student logits
        inputs = chunk_inputs(kinds, z, labels[sl], flat, sl, vocab, T, top_k)
        vals = {}
        for n in per_token:
            v = call(n, inputs[TERMS[n].teacher], beta)                # [c]
            vals[n] = v * T * T if TERMS[n].tempered else v
        loss = sum(terms[n] * v.sum() / norm[n] for n, v in vals.items())
        (loss * scale).backward()                                      # frees this chunk's logits
        total += float(loss.detach())
        for n, v in vals.items():
            parts[n] += float(v.detach().sum()) / norm[n]
    hidden = [n for n in terms if TERMS[n].teacher == "hidden"]
    if hidden:   # on whole hidden states [N, H]: no logits, so no chunks
        hs = proj(h) if proj is not None else h
        loss = 0.0
        for n in hidden:
            # the first teacher's hidden states; clone: out of inference mode, so autograd may save them
            v = call(n, (hs, flat.hidden[0].clone()), beta).mean()
            loss = loss + terms[n] * v
            parts[n] = float(v.detach())
        (loss * scale).backward()
        total += float(loss.detach())
    if h.grad is not None:
        h_s.backward(h.grad.view_as(h_s))                              # through the student's body
    return total, parts


def chunk_inputs(kinds: set, z, labels, flat: Teachers, sl: slice, vocab: int, T: float, top_k: int) -> dict:
    """What each kind of per-token term (spec.Term.teacher) takes, for one chunk of c tokens.

    z: student logits [c, V]; labels: [c]; flat: the teacher side with tokens flattened ([N, ...]).
    Each input is made once per chunk, however many terms read it.
    """
    inputs = {}
    if "dist" in kinds:   # student and teachers' mixture log-probs at temperature T, [c, V] each
        inputs["dist"] = (F.log_softmax(z / T, dim=-1), teacher_logp(flat, sl, vocab, T))
    if "topk" in kinds:   # at T=1: student log-probs [c, V]; teacher top-k ids [c, K] and log-probs [c, K]
        if flat.cached is not None:
            t_idx, t_val = flat.cached[0][sl], flat.cached[1][sl].float()
        else:
            t_val, t_idx = teacher_logp(flat, sl, vocab, 1.0).topk(top_k, dim=-1)
        inputs["topk"] = (F.log_softmax(z, dim=-1), t_idx, t_val)
    if None in kinds:     # the data: student logits [c, V], next-token labels [c]
        inputs[None] = (z, labels)
    return inputs


def teacher_logp(flat: Teachers, sl: slice, vocab: int, T: float):
    """The teachers' mixture log-probs at temperature T for one chunk of tokens: [c, V]."""
    with torch.no_grad():
        logps = [F.log_softmax(head(h[sl])[:, :vocab].float() / T, dim=-1)
                 for head, h in zip(flat.heads, flat.hidden)]
        return losses.mix_teachers(logps, flat.weights)


def call(name: str, inputs: tuple, beta: float):
    """Term `name`'s function in losses.py (spec.TERMS) on the inputs its kind takes: [c] values."""
    t = TERMS[name]
    fn = getattr(losses, t.fn)
    return fn(*inputs, beta) if t.beta else fn(*inputs)

