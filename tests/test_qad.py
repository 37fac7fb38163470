"""Quantization-aware distillation on tiny models: GGUF block formats packed byte for byte, tuned
files that llama.cpp and onnxruntime run as the torch model computed them, lower KLD than the plain
file on held-out tokens, resume after a kill, and one-line refusals."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from compress import artifacts
from compress.config import load_config
from compress.errors import UserError
from compress.quantize import blocks, qad
from compress.quantize.header import tensors_of
from conftest import SHARED, make_tiny, save_data_artifact, save_hf_artifact


@pytest.mark.parametrize("qtype", tuple(blocks.LAYOUT))   # K-quants: test_qad_kquants.py
def test_blocks_unpack_to_ggufs_values_and_pack_back_byte_for_byte(qtype):
    x = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32) * 0.05
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    b = blocks.unpack(raw, qtype, 256)
    assert np.array_equal(b.values(), gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]))
    assert np.array_equal(blocks.pack(b), raw)
    lo, hi = b.code_range()
    assert b.q.min() >= lo and b.q.max() <= hi


@pytest.mark.parametrize("qtype", tuple(blocks.LAYOUT))   # K-quants: test_qad_kquants.py
def test_new_scales_and_mins_are_what_the_dequantizer_reads(qtype):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    b = blocks.unpack(gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]), qtype, 64)
    rng = np.random.default_rng(2)
    b.d = (b.d * rng.uniform(0.8, 1.2, b.d.shape)).astype(np.float32)
    if b.m is not None:
        b.m = (b.m + rng.uniform(-0.1, 0.1, b.m.shape)).astype(np.float32)
    got = gguf.quants.dequantize(blocks.pack(b), gguf.GGMLQuantizationType[qtype])
    d16 = b.d.astype(np.float16).astype(np.float32)
    want = d16[..., None] * b.q + (0 if b.m is None else b.m.astype(np.float16).astype(np.float32)[..., None])
    assert np.array_equal(got, want.reshape(4, 64))


def test_codes_out_of_range_are_refused():
    b = blocks.unpack(gguf.quants.quantize(np.ones((1, 32), np.float32), gguf.GGMLQuantizationType.Q4_0), "Q4_0", 32)
    b.q[0, 0, 0] = 8
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        blocks.pack(b)


# ---------------------------------------------------------------- a tuned tiny model, GGUF and ONNX

def texts():
    src = SHARED / "tiny_shakespeare" / "input.txt"
    paras = [p for p in src.read_text().split("\n\n") if len(p) > 200][:90] if src.exists() else \
        [("The quick brown fox jumps over the lazy dog. " * 12 + f"Sample {i}.") for i in range(90)]
    return paras[:75], paras[75:]


TINY_QAD = ["quantize.imatrix_tokens=1024", "qad.tokens=8192", "qad.seq_len=64", "qad.batch=2", "qad.lr=0.003",
            "qad.checkpoint_every=4", "qad.sampled=0"]   # in-domain tuning: the tests' held-out set is its domain


def tiny_tuned(work, tokenizer, qtype: str, hidden: int, intermediate: int, seed: int):
    """A tiny teacher (its matrices scaled down, as a trained model's are), its `qtype` by llama.cpp's
    quantizer with an importance matrix, and that file tuned: (cfg, teacher, data, plain, tuned)."""
    from compress.export import gguf as export_gguf
    from compress.quantize import gguf as quantize_gguf, imatrix
    train, heldout = texts()
    data = save_data_artifact(train, heldout, work / "data")
    model = make_tiny(tokenizer, hidden=hidden, intermediate=intermediate, heads=4, kv_heads=2, layers=2, seed=seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.4)
    teacher = save_hf_artifact(model, tokenizer, work / "teacher", stage="teacher")
    cfg = load_config([f"out={work}", "name=r", *TINY_QAD])
    f16 = export_gguf.run(cfg, teacher, work / "teacher-gguf-F16")
    im = imatrix.run(cfg, teacher, work / "teacher-imatrix", data=data)
    plain = quantize_gguf.run(cfg, f16, work / f"teacher-gguf-{qtype}", qtype=qtype, imatrix=im)
    art = qad.run(cfg, plain, work / f"teacher-gguf-{qtype}-qad", hf=teacher, teacher=teacher, data=data)
    return cfg, teacher, data, plain, art


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tokenizer):
    """A tiny teacher 128 wide, its Q4_0 and the tuned Q4_0."""
    work = tmp_path_factory.mktemp("qad")
    cfg, teacher, data, plain, art = tiny_tuned(work, tokenizer, "Q4_0", hidden=128, intermediate=256, seed=5)
    return cfg, work, teacher, data, plain, art


def heldout_ids(tokenizer, data, n=256):
    from compress.data import read_texts, token_stream
    return token_stream(tokenizer, read_texts(data, "heldout"), limit=n)[:n]


def file_model(hf, gguf_path):
    """The HF model with every matrix set to the values the GGUF holds."""
    from compress.models import load_model
    model = load_model(str(hf.path))
    stored = tensors_of(gguf_path)
    plan = qad.match(model, stored)
    qad.load_fixed(model, stored, plan, qad.row_orders(model.config, plan), skip=set())
    return model


def torch_logprobs(model, ids):
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def llama_logprobs(path, ids):
    from compress.quantize.mix import logprobs
    return logprobs(path, ids)


def test_the_tuned_file_is_the_plain_one_with_new_scales(tuned):
    _, _, _, _, plain, art = tuned
    assert art.file.stat().st_size == plain.file.stat().st_size
    a, b = tensors_of(plain.file), tensors_of(art.file)
    changed = 0
    for name, t in a.items():
        if t.type not in blocks.TUNABLE or name == "token_embd.weight":
            assert np.array_equal(t.data, b[name].data), name
            continue
        pa, pb = blocks.unpack(t.data, t.type, t.cols), blocks.unpack(b[name].data, t.type, t.cols)
        assert np.array_equal(pa.q, pb.q), name           # the integer codes stay
        changed += not np.array_equal(pa.d, pb.d)
    assert changed == art.meta["metrics"]["tuned_tensors"] == 14
    m = art.meta["metrics"]
    assert m["tokens"] == 8192 and m["steps"] == 64 and m["seconds"] > 0 and m["shipped"] == "tuned"
    assert m["kept_tensors"] == {"token_embd.weight": a["token_embd.weight"].type}


def test_llama_cpp_runs_the_tuned_file_as_the_torch_model_computes_it(tuned, tokenizer):
    from compress.evaluate.quality import kld
    _, _, teacher, data, plain, art = tuned
    ids = heldout_ids(tokenizer, data, 128)
    got, want = llama_logprobs(art.file, ids), torch_logprobs(file_model(teacher, art.file), ids)
    # llama.cpp rounds activations to 8 bits before a Q4_0 product: that is the runtime's tolerance,
    # the same for the plain file, and far below what tuning changed.
    tolerance = kld(torch_logprobs(file_model(teacher, plain.file), ids), llama_logprobs(plain.file, ids))
    assert kld(want, got) < max(2 * tolerance, 1e-5) and kld(want, got) < 1e-3
    assert kld(want, got) < 0.1 * kld(llama_logprobs(plain.file, ids), got)
    decided = np.sort(want, -1)[:, -1] - np.sort(want, -1)[:, -2] > 0.05   # no near-tie at the top
    assert (got.argmax(-1) == want.argmax(-1))[decided].all()


def test_tuning_lowers_kld_on_held_out_tokens_in_llama_cpp(tuned, tokenizer):
    from compress.evaluate.quality import kld
    from compress.models import load_model
    _, _, teacher, data, plain, art = tuned
    ids = heldout_ids(tokenizer, data)
    ref = torch_logprobs(load_model(str(teacher.path)), ids)
    before, after = kld(ref, llama_logprobs(plain.file, ids)), kld(ref, llama_logprobs(art.file, ids))
    assert after < 0.8 * before, (before, after)
    check = art.meta["metrics"]["check"]
    assert check is None or check["tuned_kld"] < check["plain_kld"]


def test_a_killed_tuning_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(tuned, tmp_path):
    from compress.models import load_model
    from compress.quantize.tune import tune
    cfg, _, teacher, data, plain, _ = tuned
    seqs, _ = qad.train_tokens(__import__("compress.models", fromlist=["x"]).load_tokenizer(str(teacher.path)),
                               data, 1024, 64)
    target = load_model(str(teacher.path))

    def trainable():
        model = load_model(str(teacher.path))
        qad.file_model(model, tensors_of(plain.file))
        return model

    whole = trainable()
    tune(whole, target, seqs, 8, 0.01, tmp_path / "a", every=3)

    class Killed(Exception):
        pass

    def die_at_5(step, total, loss):
        if step == 5:
            raise Killed
    broken = trainable()
    with pytest.raises(Killed):
        tune(broken, target, seqs, 8, 0.01, tmp_path / "b", every=3, log=die_at_5)
    resumed = trainable()
    hist = tune(resumed, target, seqs, 8, 0.01, tmp_path / "b", every=3)
    assert hist["steps"] == 8 and len(hist["loss"]) == 8
    for (name, p), (_, q) in zip(whole.named_parameters(), resumed.named_parameters()):
        if p.requires_grad:
            assert torch.allclose(p, q, atol=1e-6), name


def test_the_hidden_term_pulls_the_layers_towards_the_teachers_and_only_for_its_own_copy(tuned, tokenizer):
    from compress.models import load_model, load_tokenizer
    from compress.quantize.tune import hidden_loss, tune
    _, _, teacher, data, plain, art = tuned
    assert art.meta["metrics"]["hidden"] == 200.0                       # the teacher's own Q4_0: on
    with pytest.raises(ValueError):                                      # layers that do not line up
        hidden_loss([torch.ones(1, 2, 4)], [torch.ones(1, 2, 4)] * 2)
    states = [torch.randn(2, 5, 8) * s for s in (1.0, 100.0)]
    assert hidden_loss(states, states).item() == 0
    shifted = [s + 0.1 * s.std() for s in states]                       # alike relative error, alike terms
    assert hidden_loss(shifted, states).item() == pytest.approx(hidden_loss(shifted[:1], states[:1]).item(), rel=0.1)

    target = load_model(str(teacher.path))
    seqs, _ = qad.train_tokens(load_tokenizer(str(teacher.path)), data, 2048, 64)
    ids = torch.tensor([heldout_ids(tokenizer, data, 128)])

    def held_out_hidden(weight):
        """The hidden-state error on held-out tokens after tuning with that weight."""
        model = load_model(str(teacher.path))
        qad.file_model(model, tensors_of(plain.file))
        if weight is not None:
            tune(model, target, seqs, 32, 0.003, tuned[1] / f"ckpt-hidden-{weight}", every=100, batch=2, hidden=weight)
        with torch.inference_mode():
            return hidden_loss(model(ids, output_hidden_states=True).hidden_states[1:],
                               target(ids, output_hidden_states=True).hidden_states[1:]).item()
    plain_err, kl_alone, with_term = held_out_hidden(None), held_out_hidden(0.0), held_out_hidden(200.0)
    # a 2-layer model's hidden states follow its logits closely, so the KL alone already pulls them
    # (0.063 -> 0.054); the term goes further (0.053)
    assert with_term < kl_alone < 0.9 * plain_err, (plain_err, kl_alone, with_term)


def test_the_teacher_cache_gives_the_same_logits_and_states_kept_or_recomputed(tuned):
    from compress.models import load_model
    from compress.quantize.tune import _teacher_cache
    _, _, teacher, _, _, _ = tuned
    target = load_model(str(teacher.path))
    seqs = torch.randint(target.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    kept = _teacher_cache(target, seqs, repeats=True, hidden=True)
    fresh = _teacher_cache(target, seqs, repeats=True, hidden=True, budget=0)
    rows = torch.tensor([2, 0])
    kept(rows)                                                      # fill the cache, then read from it
    (lk, sk), (lf, sf) = kept(rows), fresh(rows)
    assert torch.equal(lk, lf) and len(sk) == target.config.num_hidden_layers
    assert all(a.shape == (2, 16, target.config.hidden_size) and torch.equal(a, b) for a, b in zip(sk, sf))
    with torch.inference_mode():
        want = target(seqs[2:3], output_hidden_states=True).hidden_states[-1][0].half()
    assert torch.equal(sk[-1][0], want)                             # row order kept within the batch


def test_a_student_of_the_teachers_shape_trains_on_the_kl_alone(tuned, tokenizer, tmp_path):
    from compress.models import load_model
    _, _, teacher, data, plain, _ = tuned
    twin = save_hf_artifact(load_model(str(teacher.path)), tokenizer, tmp_path / "distilled")
    cfg = load_config([f"out={tmp_path}", "name=r", *TINY_QAD, "qad.tokens=512"])
    art = qad.run(cfg, plain, tmp_path / "gguf-Q4_0-qad", hf=twin, teacher=teacher, data=data)
    assert art.meta["metrics"]["hidden"] == 0.0 and art.meta["metrics"]["steps"] == 4


def test_a_sigkilled_tuning_resumes_from_its_checkpoint_and_ends_where_an_unbroken_one_does(tuned, tmp_path):
    """With teacher-sampled rows (qad.sampled), so the resume also reads back the sampled text."""
    import signal
    import subprocess
    import sys
    import time
    cfg, work, teacher, data, plain, _ = tuned
    out = tmp_path / "teacher-gguf-Q4_0-qad"
    args = [f"out={tmp_path}", "name=r", *TINY_QAD, "qad.sampled=0.25"]
    script = (
        "from compress import artifacts\n"
        "from compress.config import load_config\n"
        "from compress.quantize import qad\n"
        f"a = lambda n: artifacts.load({str(work)!r} + '/' + n)\n"
        f"qad.run(load_config({args!r}), a('teacher-gguf-Q4_0'), {str(out)!r}, hf=a('teacher'), "
        "teacher=a('teacher'), data=a('data'))\n")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=log, stderr=log)
    deadline, ckpt = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None and ckpt is None:
        found = list((tmp_path / "checkpoints").glob("*/checkpoint.pt"))
        ckpt = found[0] if found and torch.load(found[0], weights_only=True)["step"] >= 8 else None
        time.sleep(0.05)
    assert ckpt is not None, (tmp_path / "killed.log").read_text()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 8 <= step < 64 and not out.exists()        # killed mid-tuning: nothing that looks finished
    assert (ckpt.parent / "sampled.pt").is_file()
    resumed = qad.run(load_config(args), plain, out, hf=teacher, teacher=teacher, data=data)
    m = resumed.meta["metrics"]
    assert m["steps"] == 64 and m["tokens"] == 8192 and m["sampled_seqs"] == round(0.25 * m["unique_tokens"] / 64) > 0 and not ckpt.parent.exists()
    whole = qad.run(load_config([f"out={tmp_path / 'w'}", *args[1:]]), plain, tmp_path / "w" / out.name,
                    hf=teacher, teacher=teacher, data=data)
    a, b = tensors_of(whole.file), tensors_of(resumed.file)
    for name, t in a.items():
        if t.type in blocks.TUNABLE and name != "token_embd.weight":
            da, db = blocks.unpack(t.data, t.type, t.cols).d, blocks.unpack(b[name].data, t.type, t.cols).d
            assert np.allclose(da, db, rtol=2e-3, atol=0), name


def test_refusals_are_one_line(tuned, tokenizer):
    cfg, work, teacher, data, plain, _ = tuned
    f16 = artifacts.load(work / "teacher-gguf-F16")
    with pytest.raises(UserError, match="starts from a file of llama.cpp's quantizer; teacher-gguf-F16 is F16"):
        qad.run(cfg, f16, work / "x-qad", hf=teacher, teacher=teacher, data=data)
    with pytest.raises(UserError, match="teacher-gguf-Q4_0 is a gguf file, not an HF model"):
        qad.run(cfg, plain, work / "x-qad", hf=plain, teacher=teacher, data=data)
    bnb_like = artifacts.Artifact(teacher.path, {**teacher.meta, "stage": "quantize", "quant": "int8"})
    with pytest.raises(UserError, match=r"is already quantized \(int8\): give the HF model"):
        qad.run(cfg, plain, work / "x-qad", hf=bnb_like, teacher=teacher, data=data)
    # a width no block type divides (48 columns): llama.cpp keeps every matrix F16
    from compress.export import gguf as export_gguf
    from compress.quantize import gguf as quantize_gguf
    narrow = save_hf_artifact(make_tiny(tokenizer, hidden=48, intermediate=80, layers=1), tokenizer, work / "narrow")
    f = quantize_gguf.run(cfg, export_gguf.run(cfg, narrow, work / "narrow-F16"), work / "narrow-Q4_0", qtype="Q4_0")
    assert set(f.meta["metrics"]["tensor_types"]) == {"F16", "F32"}
    with pytest.raises(UserError, match="holds no tensor of a type qad can tune"):
        qad.run(cfg, f, work / "x-qad", hf=narrow, teacher=narrow, data=data)
    cfg0 = load_config([f"out={work}", "name=r", *TINY_QAD, "qad.tokens=16"])
    with pytest.raises(UserError, match=r"qad.tokens=16 is less than one step of qad.seq_len x qad.batch = 128"):
        qad.run(cfg0, plain, work / "x-qad", hf=teacher, teacher=teacher, data=data)
    with pytest.raises(UserError, match="add export.onnx=fp32 or drop int4 from qad.types"):
        load_config(["qad.types=[int4]"])
    with pytest.raises(UserError, match="set export.gguf=F16 or drop Q4_0"):
        load_config(["qad.types=[Q4_0]", "export.gguf=null", "quantize.gguf=[]"])
    with pytest.raises(UserError, match="qad.tokens"):
        load_config(["qad.tokens=0"])
    with pytest.raises(UserError, match="give qad.tokens>=256"):
        load_config(["qad.types=[Q4_0]", "qad.tokens=100"])
    with pytest.raises(UserError, match="quantize.teacher=false does not build"):
        load_config(["qad.types=[Q4_0]", "qad.of=[teacher]", "quantize.teacher=false"])
    with pytest.raises(UserError, match="qad.types"):
        load_config(["qad.types=[Q4_9]"])
    assert not (work / "x-qad").exists()


# ---------------------------------------------------------------- ONNX INT4 (MatMulNBits)

@pytest.fixture(scope="module")
def tuned_onnx(tuned):
    pytest.importorskip("onnxruntime_genai")
    from compress.export import onnx as export_onnx
    from compress.quantize import onnx as quantize_onnx, qad_onnx
    _, work, teacher, data, _, _ = tuned
    cfg = load_config([f"out={work}", "name=r", "export.onnx=fp32", "quantize.onnx=[int4]", *TINY_QAD])
    fp32 = export_onnx.run(cfg, teacher, work / "teacher-onnx-fp32", teacher=teacher)
    plain = quantize_onnx.run(cfg, teacher, work / "teacher-onnx-int4", qtype="int4", fp32=fp32)
    art = qad_onnx.run(cfg, plain, work / "teacher-onnx-int4-qad", hf=teacher, teacher=teacher, data=data)
    return teacher, data, plain, art


def onnx_file_model(hf, path):
    """The HF model with every matrix set to the values the INT4 ONNX file holds."""
    import onnx
    from compress.models import load_model
    from compress.quantize import qad_onnx
    model = load_model(str(hf.path))
    mats = qad_onnx.matmuls(onnx.load(str(path), load_external_data=True))
    plan = {name: qad_onnx.hf_modules(model, name, m["N"]) for name, m in mats.items() if name != "lm_head"}
    for mod, (q, d, _) in qad_onnx.module_blocks(mats, plan).items():
        model.get_submodule(mod).weight.data.copy_(torch.from_numpy((q * d[..., None]).reshape(q.shape[0], -1)))
    qad_onnx.load_fixed(model, mats)
    return model


def ort_logprobs(path, ids):
    from compress.quantize.qad_onnx import logprobs
    return logprobs(path, ids)


def test_the_tuned_onnx_keeps_codes_and_zero_points_and_holds_the_trained_scales(tuned_onnx):
    import onnx
    from compress.quantize import qad_onnx
    _, _, plain, art = tuned_onnx
    a = qad_onnx.matmuls(onnx.load(str(plain.file), load_external_data=True))
    b = qad_onnx.matmuls(onnx.load(str(art.file), load_external_data=True))
    changed = 0
    for name in a:
        qa, da = qad_onnx.codes(a[name]) if a[name]["bits"] == 4 else (None, None)
        qb, db = qad_onnx.codes(b[name]) if b[name]["bits"] == 4 else (None, None)
        if qa is not None:
            assert np.array_equal(qa, qb), name
            changed += not np.array_equal(da, db)
    assert changed == art.meta["metrics"]["tuned_tensors"] > 0
    assert abs(art.meta["size_bytes"] - plain.meta["size_bytes"]) <= 0.01 * plain.meta["size_bytes"]


def test_onnxruntime_runs_the_tuned_file_as_the_torch_model_computes_it_and_it_loses_less(tuned_onnx, tokenizer):
    from compress.evaluate.quality import kld
    from compress.models import load_model
    teacher, data, plain, art = tuned_onnx
    ids = heldout_ids(tokenizer, data, 128)
    got = ort_logprobs(art.file, ids)
    want = torch_logprobs(onnx_file_model(teacher, art.file), ids)
    tolerance = kld(torch_logprobs(onnx_file_model(teacher, plain.file), ids), ort_logprobs(plain.file, ids))
    assert kld(want, got) < max(2 * tolerance, 1e-5) and kld(want, got) < 1e-3
    ids = heldout_ids(tokenizer, data)
    ref = torch_logprobs(load_model(str(teacher.path)), ids)
    before, after = kld(ref, ort_logprobs(plain.file, ids)), kld(ref, ort_logprobs(art.file, ids))
    assert after < 0.8 * before, (before, after)


# ---------------------------------------------------------------- in the pipeline

def test_profiles_plan_the_tuned_siblings_beside_their_plain_files(tmp_path):
    from compress.pipeline import plan
    names = [s.name for s in plan(load_config([f"out={tmp_path}", "name=r", "profile=phone"]))]
    assert {"teacher-gguf-Q4_0", "teacher-gguf-Q4_0-qad", "eval-teacher-gguf-Q4_0-qad"} <= set(names)
    assert "gguf-Q4_0" not in names          # qad.of=[teacher]: the student's Q4_0 is not built for it
    steps = plan(load_config([f"out={tmp_path}", "name=r", "profile=browser", "qad.of=[teacher,student]"]))
    names = [s.name for s in steps]
    assert {"teacher-onnx-int4-qad", "onnx-int4-qad"} <= set(names)
    browser = next(s for s in steps if s.name == "browser")
    # the tuned INT4 is the layout's model_q4.onnx in place of the plain one
    assert "onnx-int4-qad" in browser.parents and "onnx-int4" not in browser.parents


def test_ort_genai_runs_the_tuned_directory_as_onnxruntime_does(tuned_onnx, tokenizer):
    og = pytest.importorskip("onnxruntime_genai")
    _, data, _, art = tuned_onnx
    ids = heldout_ids(tokenizer, data, 24)
    model = og.Model(str(art.path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    logits = np.asarray(gen.get_logits()).reshape(-1)          # the next token's, after the prompt
    want = ort_logprobs(art.file, ids)[-1]
    got = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert np.abs(got - want).max() < 1e-3


def test_sampled_text_replaces_its_fraction_of_rows_and_a_resume_trains_on_the_same_text(tuned, tmp_path):
    from compress.models import load_model, load_tokenizer
    _, _, teacher, data, _, _ = tuned
    seqs, _ = qad.train_tokens(load_tokenizer(str(teacher.path)), data, 1024, 64)
    target = load_model(str(teacher.path))
    state = torch.random.get_rng_state()
    rows, _ = qad.with_sampled(target, seqs, 0.25, tmp_path / "a")
    assert torch.equal(torch.random.get_rng_state(), state)      # the run's own randomness is untouched
    replaced = [i for i in range(len(seqs)) if not torch.equal(rows[i], seqs[i])]
    assert len(seqs) == 16 and len(replaced) == 4 and replaced != [12, 13, 14, 15]   # spread, not bunched
    assert rows.shape == seqs.shape and int(rows.max()) < target.config.vocab_size
    again, _ = qad.with_sampled(target, seqs, 0.25, tmp_path / "b")
    assert torch.equal(again, rows)                               # seeded: the same text every time
    saved = torch.load(tmp_path / "a" / "sampled.pt", weights_only=True)
    torch.save(saved.flip(0), tmp_path / "a" / "sampled.pt")      # a resume reads the saved text back
    resumed, _ = qad.with_sampled(target, seqs, 0.25, tmp_path / "a")
    assert torch.equal(resumed[replaced], saved.flip(0))
    assert qad.with_sampled(target, seqs, 0.0, tmp_path / "c")[0] is seqs and not (tmp_path / "c").exists()
