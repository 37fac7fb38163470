"""Distillation losses as small pure functions.

Shapes: logits [B, T, V] (float), labels [B, T] (int64, -100 = ignore). Every loss returns a scalar
averaged over the non-ignored positions.
"""
from __future__ import annotations

import math

import torch.nn.functional as F


def kl_teacher_student(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """Mean over masked positions of KL(p_teacher,T || p_student,T), in nats.

    student_logits, teacher_logits: [B, T, V]; mask: [B, T] bool.
    """
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)   # [N, V]
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)   # [N, V]
    return (t.exp() * (t - s)).sum(-1).mean()


def cross_entropy(student_logits, labels):
    """Next-token CE on the data; labels are the input ids, shifted here."""
    logits = student_logits[:, :-1].float()                  # [B, T-1, V]
    target = labels[:, 1:]                                   # [B, T-1]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100)


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE (Hinton et al. 2015).

    The T^2 factor keeps the KD gradient's scale independent of T. Returns (loss, parts dict).
    """
    mask = labels != -100                                    # [B, T]
    kd = kl_teacher_student(student_logits, teacher_logits, mask, temperature)
    ce = cross_entropy(student_logits, labels)
    loss = alpha * temperature ** 2 * kd + (1 - alpha) * ce
    return loss, {"kd": kd.detach(), "ce": ce.detach()}


def scheduled(start: float, end: float | None, progress: float, kind: str = "linear") -> float:
    """A value moving from `start` to `end` as progress goes 0 -> 1 (constant when end is None)."""
    if end is None:
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
