"""Distillation losses against hand computations."""
import math

import torch

from compress.distill.losses import cross_entropy, kd_loss, kl_teacher_student, scheduled, warmup_cosine


def softmax(xs, T=1.0):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def test_kl_matches_hand_computation():
    s, t = [1.0, 0.0, -1.0], [0.5, 0.5, 0.0]
    for T in (1.0, 2.0):
        p, q = softmax(t, T), softmax(s, T)
        want = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        got = kl_teacher_student(torch.tensor([[s]]), torch.tensor([[t]]), torch.tensor([[True]]), T)
        assert abs(float(got) - want) < 1e-6


def test_kl_is_zero_for_equal_distributions_and_ignores_masked_positions():
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert float(kl_teacher_student(x, x, mask, 2.0)) < 1e-6
    y = x.clone()
    y[0, 2] += 10.0                      # a masked position must not count
    assert float(kl_teacher_student(x, y, mask, 2.0)) < 1e-6


def test_cross_entropy_predicts_the_next_token():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]]])   # [1, 3, 3]
    labels = torch.tensor([[0, 1, 2]])
    # position 0 predicts label 1, position 1 predicts label 2
    want = (-math.log(softmax([2, 0, 0])[1]) - math.log(softmax([0, 3, 0])[2])) / 2
    assert abs(float(cross_entropy(logits, labels)) - want) < 1e-6


def test_kd_loss_combines_terms_with_alpha_and_T_squared():
    torch.manual_seed(0)
    s, t = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    labels = torch.randint(0, 6, (1, 4))
    T, alpha = 2.0, 0.7
    loss, parts = kd_loss(s, t, labels, T, alpha)
    kd = kl_teacher_student(s, t, labels != -100, T)
    ce = cross_entropy(s, labels)
    assert torch.allclose(loss, alpha * T * T * kd + (1 - alpha) * ce)
    assert torch.allclose(parts["kd"], kd) and torch.allclose(parts["ce"], ce)
    only_ce, _ = kd_loss(s, t, labels, T, 0.0)
    assert torch.allclose(only_ce, ce)


def test_schedules():
    assert scheduled(2.0, None, 0.5) == 2.0
    assert scheduled(2.0, 1.0, 0.0) == 2.0 and scheduled(2.0, 1.0, 1.0) == 1.0
    assert abs(scheduled(2.0, 1.0, 0.5, "linear") - 1.5) < 1e-9
    assert abs(scheduled(2.0, 1.0, 0.5, "cosine") - 1.5) < 1e-9
    assert scheduled(2.0, 1.0, 0.25, "cosine") > scheduled(2.0, 1.0, 0.25, "linear")
    lrs = [warmup_cosine(s, 100, 10) for s in range(100)]
    assert lrs[0] == 0.1 and abs(lrs[9] - 1.0) < 1e-9
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] >= 0.1
