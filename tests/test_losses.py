"""Distillation losses against hand computations."""
import math

import pytest
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


# ---------------------------------------------------------------- the loss family, by hand

from compress.distill import losses  # noqa: E402

P_T, P_S = [0.5, 0.3, 0.2], [0.2, 0.5, 0.3]      # teacher and student distributions over 3 tokens


def logp(ps):
    return torch.tensor([[math.log(p) for p in ps]])   # [1, 3]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def test_forward_and_reverse_kl_by_hand():
    assert abs(float(losses.forward_kl(logp(P_S), logp(P_T))) - kl(P_T, P_S)) < 1e-6
    assert abs(float(losses.reverse_kl(logp(P_S), logp(P_T))) - kl(P_S, P_T)) < 1e-6


def test_generalized_jsd_by_hand_and_its_limits():
    beta = 0.3
    m = [beta * t + (1 - beta) * s for t, s in zip(P_T, P_S)]
    want = beta * kl(P_T, m) + (1 - beta) * kl(P_S, m)
    assert abs(float(losses.generalized_jsd(logp(P_S), logp(P_T), beta)) - want) < 1e-6
    assert abs(float(losses.generalized_jsd(logp(P_S), logp(P_T), 0.0)) - kl(P_T, P_S)) < 1e-6
    assert abs(float(losses.generalized_jsd(logp(P_S), logp(P_T), 1.0)) - kl(P_S, P_T)) < 1e-6


def test_tvd_by_hand():
    want = 0.5 * sum(abs(t - s) for t, s in zip(P_T, P_S))
    assert abs(float(losses.tvd(logp(P_S), logp(P_T))) - want) < 1e-6


def test_topk_kl_folds_the_tail_into_one_bin():
    t_idx = torch.tensor([[0, 1]])                          # teacher top-2: tokens 0 and 1
    t_val = torch.log(torch.tensor([[0.5, 0.3]]))
    # bins: token 0, token 1, tail {2}; teacher tail 0.2, student tail 0.3
    want = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    assert abs(float(losses.topk_kl(logp(P_S), t_idx, t_val)) - want) < 1e-6
    full = losses.topk_kl(logp(P_S), torch.tensor([[0, 1, 2]]), logp(P_T))   # K = V: the full KL
    assert abs(float(full) - kl(P_T, P_S)) < 1e-5


def test_hidden_state_terms_by_hand():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert abs(float(losses.hidden_mse(a, b)) - (1 + 4) / 2) < 1e-6
    assert abs(float(losses.hidden_cos(a, b)) - 1.0) < 1e-6
    assert float(losses.hidden_cos(a, 3 * a)) < 1e-6


def test_mix_teachers_averages_probabilities():
    q = [0.1, 0.1, 0.8]
    got = losses.mix_teachers([logp(P_T), logp(q)], [3.0, 1.0]).exp()
    want = [(3 * t + u) / 4 for t, u in zip(P_T, q)]
    assert torch.allclose(got, torch.tensor([want]), atol=1e-6)


def test_token_ce_ignores_minus_100():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    got = losses.token_ce(logits, torch.tensor([1, -100]))
    assert abs(float(got[0]) + math.log(softmax([2, 0, 0])[1])) < 1e-6 and float(got[1]) == 0.0


def test_constant_schedule_ignores_the_end_value():
    assert scheduled(2.0, 1.0, 0.7, "constant") == 2.0


def test_loss_spec_parsing():
    from compress.distill.spec import parse_cache, parse_loss
    assert parse_loss("fkl:0.9,ce:0.1") == {"fkl": 0.9, "ce": 0.1}
    assert parse_loss("jsd") == {"jsd": 1.0}
    assert parse_loss(None, 0.7) == {"fkl": 0.7, "ce": pytest.approx(0.3)}
    assert parse_loss(None) == {"fkl": 0.9, "ce": pytest.approx(0.1)}
    assert parse_cache("topk:32") == 32 and parse_cache(None) is None
