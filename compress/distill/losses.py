"""Distillation losses as small pure functions.

Per-token terms take log-probabilities over the shared vocabulary, s_logp / t_logp: [N, V] float
(N tokens, already flattened and tempered by the caller), and return [N] values in nats; the caller
weighs and averages them (distill/kd.py does it chunk by chunk). Sequence-shaped helpers take
logits [B, T, V] and labels [B, T] (int64, -100 = ignore) and return a scalar mean.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------- per-token divergences, [N, V] -> [N]

def forward_kl(s_logp, t_logp):
    """KL(p_teacher || p_student) = sum_v p_t (log p_t - log p_s): mode-covering (Hinton KD)."""
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def reverse_kl(s_logp, t_logp):
    """KL(p_student || p_teacher): mode-seeking (MiniLLM)."""
    return (s_logp.exp() * (s_logp - t_logp)).sum(-1)


def generalized_jsd(s_logp, t_logp, beta: float):
    """GKD's generalized JSD (Agarwal et al. 2024, TRL's definition): with m = beta p_t + (1-beta) p_s,
    beta KL(p_t || m) + (1-beta) KL(p_s || m). beta=0 is forward KL and beta=1 reverse KL (the
    limits, taken exactly as TRL does)."""
    if beta == 0:
        return forward_kl(s_logp, t_logp)
    if beta == 1:
        return reverse_kl(s_logp, t_logp)
    m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    return beta * forward_kl(m, t_logp) + (1 - beta) * forward_kl(m, s_logp)


def tvd(s_logp, t_logp):
    """Total variation distance, 1/2 sum_v |p_t - p_s| (bounded by 1; robust to teacher outliers)."""
    return 0.5 * (t_logp.exp() - s_logp.exp()).abs().sum(-1)


def topk_kl(s_logp, t_idx, t_logp_k):
    """Sparse KL on the teacher's top-k tokens plus one bin for the rest of the vocabulary.

    s_logp: [N, V] student log-probs; t_idx: [N, K] int64 teacher top-k token ids; t_logp_k: [N, K]
    their teacher log-probs. Both distributions are folded onto K+1 bins (the K tokens and the tail,
    1 - sum of the K probabilities), so the teacher's missing mass is not silently dropped; by the
    data-processing inequality the value is a lower bound of the full forward KL, equal when K = V.
    """
    s_k = s_logp.gather(-1, t_idx)                                     # [N, K]
    eps = 1e-12
    t_tail = (1 - t_logp_k.exp().sum(-1)).clamp_min(eps)               # [N]
    s_tail = (1 - s_k.exp().sum(-1)).clamp_min(eps)
    head = (t_logp_k.exp() * (t_logp_k - s_k)).sum(-1)
    return head + t_tail * (t_tail.log() - s_tail.log())


def token_ce(logits, labels):
    """Per-token CE: logits [N, V], labels [N] (-100 = ignore, giving 0)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")


def hidden_mse(h_s, h_t):
    """Mean squared error per token between (projected) student and teacher hidden states [N, H]."""
    return (h_s.float() - h_t.float()).pow(2).mean(-1)


def hidden_cos(h_s, h_t):
    """1 - cosine similarity per token of (projected) student and teacher hidden states [N, H]."""
    return 1 - F.cosine_similarity(h_s.float(), h_t.float(), dim=-1)


def mix_teachers(t_logps: list, weights: list[float]):
    """log(sum_i w_i p_i) / sum w: the weighted average of several teachers' distributions,
    each [N, V] log-probs over the shared vocabulary (averaging probabilities, not logits)."""
    if len(t_logps) == 1:
        return t_logps[0]
    total = sum(weights)
    return torch.logsumexp(torch.stack([lp + math.log(w / total) for lp, w in zip(t_logps, weights) if w > 0]), dim=0)


# ---------------------------------------------------------------- sequence-shaped, [B, T, V] -> scalar

def kl_teacher_student(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """Mean over masked positions of KL(p_teacher,T || p_student,T), in nats.

    student_logits, teacher_logits: [B, T, V]; mask: [B, T] bool.
    """
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)   # [N, V]
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)   # [N, V]
    return forward_kl(s, t).mean()


def cross_entropy(student_logits, labels):
    """Next-token CE on the data; labels are the input ids, shifted here."""
    logits = student_logits[:, :-1].float()                  # [B, T-1, V]
    target = labels[:, 1:]                                   # [B, T-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (Hinton et al. 2015), on whole
    [B, T, V] logits: the unchunked reference that distill/kd.py must equal. Returns (loss, parts)."""
    mask = labels != -100                                    # [B, T]
    kd = kl_teacher_student(student_logits, teacher_logits, mask, temperature)
    ce = cross_entropy(student_logits, labels)
    loss = alpha * temperature ** 2 * kd + (1 - alpha) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach()}


# ---------------------------------------------------------------- schedules

def scheduled(start: float, end: float | None, progress: float, kind: str = "linear") -> float:
    """A value moving from `start` to `end` as progress goes 0 -> 1: constant (also when end is
    None), linear, or cosine annealing (slow at both ends)."""
    if end is None or kind == "constant":
        return start
    p = min(max(progress, 0.0), 1.0)
    w = p if kind == "linear" else 0.5 * (1 - math.cos(math.pi * p))
    return start + (end - start) * w


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine decay to 0.1 at the last step."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
