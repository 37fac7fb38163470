"""The chunked distillation loss equals the whole-logits computation; vocabularies, teacher cache,
several teachers, on tiny models."""
import pytest
import torch
import torch.nn.functional as F

from compress import artifacts
from compress.config import load_config
from compress.distill import kd, losses, teachers
from compress.errors import UserError
from conftest import make_tiny, save_hf_artifact


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(student, teacher_models, weights, ids, terms, T, beta=0.5, top_k=8, proj=None):
    """Whole [B, S, V] logits, each term's plain mean: what kd.chunked_loss_backward must equal."""
    z = student(ids).logits.float()                                  # [B, S, V]
    V = min(z.size(-1), *(m.config.vocab_size for m in teacher_models))
    z = z[..., :V].reshape(-1, V)
    with torch.no_grad():
        tz = [m(ids).logits.float()[..., :V].reshape(-1, V) for m in teacher_models]
    total = 0.0
    for n, w in terms.items():
        if n in ("fkl", "rkl", "jsd", "tvd"):
            s, t = F.log_softmax(z / T, -1), losses.mix_teachers([F.log_softmax(x / T, -1) for x in tz], weights)
            v = kd.call(n, (s, t), beta).mean() * T * T
        elif n == "topk":
            val, idx = losses.mix_teachers([F.log_softmax(x, -1) for x in tz], weights).topk(top_k, -1)
            v = losses.topk_kl(F.log_softmax(z, -1), idx, val).mean()
        elif n == "ce":
            v = losses.cross_entropy(z.view(*ids.shape, V), ids)
        else:
            h = student.model(ids).last_hidden_state.reshape(ids.numel(), -1)
            ht = teacher_models[0].model(ids).last_hidden_state.reshape(ids.numel(), -1).detach()
            v = getattr(losses, n)(proj(h) if proj is not None else h, ht).mean()
        total = total + w * v
    total.backward()
    return float(total.detach())


def chunked(student, teacher_models, weights, ids, terms, T, chunk, beta=0.5, top_k=8, proj=None):
    body, head = kd.body_and_head(student)
    with torch.inference_mode():
        hidden = [m.model(input_ids=ids).last_hidden_state for m in teacher_models]
    tb = kd.Teachers(hidden=hidden, heads=[m.lm_head for m in teacher_models], weights=weights)
    V = min(student.config.vocab_size, *(m.config.vocab_size for m in teacher_models))
    loss, _ = kd.chunked_loss_backward(body(input_ids=ids).last_hidden_state, head, tb, ids, terms, T, V,
                                       beta, top_k, proj, chunk)
    return loss


@pytest.mark.parametrize("terms", [{"fkl": 0.9, "ce": 0.1}, {"rkl": 0.5, "jsd": 0.3, "tvd": 0.2},
                                   {"topk": 1.0, "ce": 0.5}, {"fkl": 1.0, "hidden_cos": 0.5, "hidden_mse": 0.1}])
def test_chunked_loss_and_grads_equal_whole_logits(tokenizer, terms):
    teacher = make_tiny(tokenizer, layers=2, hidden=96, heads=4, kv_heads=2, seed=1)
    ids = torch.randint(0, len(tokenizer), (2, 24))
    torch.manual_seed(3)
    proj = torch.nn.Linear(64, 96, bias=False) if any(n.startswith("hidden") for n in terms) else None
    a, b = make_tiny(tokenizer, seed=2), make_tiny(tokenizer, seed=2)
    want = reference(a, [teacher], [1.0], ids, terms, T=2.0, proj=proj)
    g_want, p_want = grads(a), proj.weight.grad.clone() if proj is not None else None
    if proj is not None:
        proj.weight.grad = None
    got = chunked(b, [teacher], [1.0], ids, terms, T=2.0, chunk=7, proj=proj)   # 48 tokens in 7 chunks
    assert got == pytest.approx(want, rel=1e-5)
    g_got = grads(b)
    assert g_got.keys() == g_want.keys()
    for n in g_want:
        assert torch.allclose(g_got[n], g_want[n], atol=1e-6, rtol=1e-4), n
    if proj is not None:
        assert torch.allclose(proj.weight.grad, p_want, atol=1e-6, rtol=1e-4)


def test_fkl_ce_chunked_equals_the_original_kd_loss(tokenizer):
    teacher = make_tiny(tokenizer, seed=1)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    a, b = make_tiny(tokenizer, seed=2), make_tiny(tokenizer, seed=2)
    loss, _ = losses.kd_loss(a(ids).logits, teacher(ids).logits.detach(), ids, 2.0, 0.8)
    loss.backward()
    got = chunked(b, [teacher], [1.0], ids, {"fkl": 0.8, "ce": 0.2}, 2.0, chunk=5)
    assert got == pytest.approx(float(loss.detach()), rel=1e-5)
    for n, g in grads(a).items():
        assert torch.allclose(grads(b)[n], g, atol=1e-6, rtol=1e-4), n


def test_two_teachers_and_padded_vocabulary(tokenizer):
    """A teacher with extra padding rows (like Qwen2.5 7B's 152,064 vs 151,936) is aligned by
    dropping them; two teachers mix as averaged distributions."""
    t1 = make_tiny(tokenizer, seed=1)
    t2 = make_tiny(tokenizer, seed=4)
    padded = make_tiny(tokenizer, seed=4)
    padded.resize_token_embeddings(len(tokenizer) + 64)
    ids = torch.randint(0, len(tokenizer), (1, 12))
    terms = {"fkl": 1.0}
    a, b = make_tiny(tokenizer, seed=2), make_tiny(tokenizer, seed=2)
    want = chunked(a, [t1, t2], [0.7, 0.3], ids, terms, 1.0, chunk=5)
    got = chunked(b, [t1, padded], [0.7, 0.3], ids, terms, 1.0, chunk=5)
    assert got == pytest.approx(want, rel=1e-5)
    assert teachers.shared_vocab(tokenizer, [len(tokenizer), len(tokenizer) + 64]) == len(tokenizer)
    with pytest.raises(UserError, match="does not cover the tokenizer"):
        teachers.shared_vocab(tokenizer, [len(tokenizer) - 1, len(tokenizer)])


def test_another_tokenizer_suggests_sequence_level_kd(tokenizer):
    class Other:
        def get_vocab(self):
            return {"a": 0, "b": 1}
    with pytest.raises(UserError, match="different tokenizers.*sequence-level KD"):
        teachers.check_tokenizer(Other(), tokenizer, "other-teacher")


def test_teacher_cache_is_built_once_and_trains_without_a_teacher(tmp_path, tokenizer, tiny_data, monkeypatch):
    from compress.distill import train
    from test_distill import prepare_run
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "cached")
    src, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
    base = [f"out={tmp_path}", "name=cached", "distill.tokens=256", "distill.seq_len=32", "distill.batch=2",
            "distill.teacher_cache=topk:8", "distill.loss=topk:0.9,ce:0.1"]
    art = train.run(load_config(base), src, run_dir / "distilled", teacher=teacher, data=data)
    meta = art.meta["metrics"]["teacher_cache"]
    assert meta["bytes_per_token"] == 48 and meta["k"] == 8
    assert art.meta["metrics"]["final_loss"] > 0
    monkeypatch.setattr(teachers, "load", lambda *a, **k: pytest.fail("the teacher was loaded"))
    again = train.run(load_config(base + ["distill.lr=1e-3"]), src, run_dir / "distilled2", teacher=teacher, data=data)
    assert again.meta["metrics"]["teacher_cache"]["path"] == meta["path"]


def test_activation_checkpointing_gives_the_same_gradients(tokenizer):
    teacher = make_tiny(tokenizer, seed=1)
    ids = torch.randint(0, len(tokenizer), (2, 16))
    a, b = make_tiny(tokenizer, seed=2).train(), make_tiny(tokenizer, seed=2).train()
    from compress.distill.step import activation_checkpointing
    activation_checkpointing(b, True)
    want = chunked(a, [teacher], [1.0], ids, {"fkl": 0.9, "ce": 0.1}, 2.0, chunk=9)
    got = chunked(b, [teacher], [1.0], ids, {"fkl": 0.9, "ce": 0.1}, 2.0, chunk=9)
    assert got == pytest.approx(want, rel=1e-6)
    for n, g in grads(a).items():
        assert torch.allclose(grads(b)[n], g, atol=1e-6, rtol=1e-5), n


def test_every_loss_term_names_a_function_in_losses():
    from compress.distill.spec import TERMS
    for name, t in TERMS.items():
        assert callable(getattr(losses, t.fn, None)), f"{name}: losses.{t.fn}"
        assert t.teacher in ("dist", "topk", "hidden", None) and (not t.tempered or t.teacher == "dist"), name
