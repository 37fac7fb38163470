"""Prune stage on tiny random Llama and Qwen2 models over the built-in teacher's tokenizer.

Each kind (layers, MLP channels, KV groups, hidden channels) must give a model whose config and
weights agree, that loads with from_pretrained and runs; keeping everything must reproduce the
logits bit for bit; the importance scores must find a planted unimportant layer / channel / head;
a pruned model must export to GGUF and give the same logits in llama.cpp.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from compress import artifacts
from compress.student import prune
from compress.config import load_config
from compress.data import read_texts
from compress.errors import UserError
from compress.models import count_params
from compress.student.depth import drop_layers
from compress.student.importance import calib_ids, depth_scores, group_scores, width_scores
from compress.student.solver import MLP_FLOOR, Dims, parse_params, resolve
from compress.student.width import keep_hidden, keep_kv_groups, keep_mlp
from conftest import make_tiny, save_hf_artifact

ARCHS = ["llama", "qwen2"]
TINY = dict(layers=4, hidden=64, heads=4, kv_heads=2, intermediate=128)


def cfg_for(*overrides):
    return load_config(["prune.calib_tokens=512", "prune.multiple=16", *overrides])


def tiny(tokenizer, arch, **kw):
    model = make_tiny(tokenizer, arch=arch, **{**TINY, **kw})
    with torch.no_grad():               # non-zero biases, so slicing them is checked too
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.2)
    return model


@pytest.fixture()
def ids(tokenizer, tiny_data):
    return calib_ids(tokenizer, read_texts(tiny_data, "train"), 512)


def logits(model, ids):
    with torch.no_grad():
        return model(ids[:1], use_cache=False).logits


def reload(art):
    return AutoModelForCausalLM.from_pretrained(str(art.path), dtype=torch.float32).eval()


# ---------------------------------------------------------------- each kind, end to end

KINDS = [   # (arch, name, targets, expected config); qwen2 in llama.cpp needs hidden = heads x head_dim
    *[(arch, "layers", ["prune.layers=2"], {"num_hidden_layers": 2}) for arch in ARCHS],
    *[(arch, "mlp", ["prune.mlp=64"], {"intermediate_size": 64}) for arch in ARCHS],
    ("llama", "heads", ["prune.heads=2"], {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}),
    ("llama", "hidden", ["prune.hidden=32"], {"hidden_size": 32, "head_dim": 16}),
    ("qwen2", "heads+hidden", ["prune.heads=2", "prune.hidden=32"],
     {"num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 32, "head_dim": 16}),
]


@pytest.mark.parametrize("arch,kind,targets,expect", KINDS, ids=[f"{k[0]}-{k[1]}" for k in KINDS])
def test_each_kind_gives_a_loadable_model(arch, kind, targets, expect, tokenizer, tiny_data, ids, tmp_path):
    src = save_hf_artifact(tiny(tokenizer, arch), tokenizer, tmp_path / "teacher", stage="teacher")
    art = prune.run(cfg_for(*targets), src, tmp_path / "pruned", data=tiny_data)
    config = json.loads((art.path / "config.json").read_text())
    assert {k: config[k] for k in expect} == expect
    model = reload(art)
    c = model.config
    d, h, layer = Dims.of(c).head_dim, c.hidden_size, model.model.layers[0]
    a, m = layer.self_attn, layer.mlp
    assert a.q_proj.weight.shape == (c.num_attention_heads * d, h)
    assert a.k_proj.weight.shape == a.v_proj.weight.shape == (c.num_key_value_heads * d, h)
    assert a.o_proj.weight.shape == (h, c.num_attention_heads * d)
    assert m.gate_proj.weight.shape == m.up_proj.weight.shape == (c.intermediate_size, h)
    assert m.down_proj.weight.shape == (h, c.intermediate_size)
    assert model.model.embed_tokens.weight.shape == (len(tokenizer), h)
    assert model.lm_head.weight is model.model.embed_tokens.weight      # still tied
    if arch == "qwen2":
        assert a.q_proj.bias.shape == (c.num_attention_heads * d,) and a.k_proj.bias.shape == (c.num_key_value_heads * d,)
    assert count_params(model) == art.meta["params"] == Dims.of(c).total() < art.meta["metrics"]["params_before"]
    out = logits(model, ids)
    assert out.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(out).all()
    assert art.meta["stage"] == "prune" and art.meta["metrics"]["pruned"]["params"] == art.meta["params"]


# ---------------------------------------------------------------- pruning nothing is exact

@pytest.mark.parametrize("arch", ARCHS)
def test_keeping_everything_reproduces_logits_exactly(arch, tokenizer, tiny_data, ids, tmp_path):
    model = tiny(tokenizer, arch)
    want = logits(model, ids)
    sliced = drop_layers(copy.deepcopy(model), list(range(4)))
    keep_mlp(sliced, [torch.arange(128)] * 4)
    keep_kv_groups(sliced, [torch.arange(2)] * 4)
    keep_hidden(sliced, torch.arange(64))
    assert torch.equal(logits(sliced, ids), want)
    # The stage with every target at the teacher's size, through save and from_pretrained.
    src = save_hf_artifact(model, tokenizer, tmp_path / "teacher", stage="teacher")
    cfg = cfg_for("prune.layers=4", "prune.mlp=128", "prune.heads=4", "prune.hidden=64")
    art = prune.run(cfg, src, tmp_path / "pruned", data=tiny_data)
    assert torch.equal(logits(reload(art), ids), want)


# ---------------------------------------------------------------- planted unimportant parts

def test_planted_identity_layer_is_dropped(tokenizer, ids):
    model = tiny(tokenizer, "llama")
    with torch.no_grad():               # layer 2 adds nothing to the residual stream
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    bi = depth_scores(model, ids, "block_influence")
    assert min(range(4), key=bi.__getitem__) == 2 and bi[2] < 1e-5 < min(bi[:2] + bi[3:])
    loss = depth_scores(model, ids, "loss")
    assert abs(loss[2]) < 1e-5 and min(abs(x) for x in loss[:2] + loss[3:]) > 1e-3
    want = logits(model, ids)
    pruned, report = prune.prune_model(model, replace(Dims.of(model.config), layers=3), ids)
    assert report["kept_layers"] == [0, 1, 3]
    assert torch.allclose(logits(pruned, ids), want, atol=1e-4)     # the dropped layer did nothing


def test_planted_weak_mlp_channel_is_dropped(tokenizer, ids):
    model = tiny(tokenizer, "qwen2")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[37] *= 1e-4      # channel 37's gate*up is ~0
    scores = width_scores(model, ids)["mlp"]
    assert (scores.argmin(-1) == 37).all()
    up = model.model.layers[0].mlp.up_proj.weight.clone()
    pruned, report = prune.prune_model(model, replace(Dims.of(model.config), mlp=127), ids)
    assert torch.equal(pruned.model.layers[0].mlp.up_proj.weight, torch.cat([up[:37], up[38:]]))
    assert report["mlp"]["kept_importance"] > 0.999


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_planted_silent_head_is_dropped(kv_heads, tokenizer, ids):
    model = tiny(tokenizer, "llama", kv_heads=kv_heads)
    d = 16
    with torch.no_grad():
        for layer in model.model.layers:
            if kv_heads == 4:   # MHA: head 1 writes nothing (its o_proj columns are zero)
                layer.self_attn.o_proj.weight[:, d:2 * d] = 0
            else:               # GQA: KV head 1 carries no values, so query heads 2 and 3 output zero
                layer.self_attn.v_proj.weight[d:2 * d] = 0
    heads = width_scores(model, ids)["heads"]                   # [layers, 4]
    weak = 1
    assert (group_scores(heads, kv_heads).argmin(-1) == weak).all()
    keep = kv_heads - 1
    want = replace(Dims.of(model.config), kv_heads=keep, heads=keep * (4 // kv_heads))
    before = logits(model, ids)
    pruned, report = prune.prune_model(model, want, ids)
    assert all(weak not in groups for groups in report["heads"]["kept_kv_groups"])
    # the removed heads wrote nothing, so the right slices were kept iff the logits are unchanged
    assert torch.allclose(logits(pruned, ids), before, atol=1e-4)


def test_planted_weak_hidden_channel_is_dropped(tokenizer, ids):
    model = tiny(tokenizer, "llama")
    with torch.no_grad():   # every norm scales channel 5 to ~0: nothing downstream reads it
        for norm in [model.model.norm] + [n for l in model.model.layers for n in (l.input_layernorm, l.post_attention_layernorm)]:
            norm.weight[5] *= 1e-4
    assert int(width_scores(model, ids)["hidden"].argmin()) == 5
    emb = model.model.embed_tokens.weight.clone()
    pruned, _ = prune.prune_model(model, replace(Dims.of(model.config), hidden=63), ids)
    assert torch.equal(pruned.model.embed_tokens.weight, torch.cat([emb[:, :5], emb[:, 6:]], 1))


# ---------------------------------------------------------------- GGUF export and llama.cpp

def llama_logits(path, tokens) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.parametrize("arch,targets", [
    ("llama", ["prune.layers=3", "prune.mlp=64", "prune.hidden=32"]),    # head_dim 16 != 32 / 4 heads
    ("qwen2", ["prune.layers=3", "prune.heads=2", "prune.mlp=96", "prune.hidden=32"]),
])
def test_pruned_model_exports_to_gguf_and_runs_in_llama_cpp(arch, targets, tokenizer, tiny_data, ids, tmp_path):
    from compress.export import gguf as export_gguf
    src = save_hf_artifact(tiny(tokenizer, arch), tokenizer, tmp_path / "teacher", stage="teacher")
    art = prune.run(cfg_for(*targets), src, tmp_path / "pruned", data=tiny_data)
    gg = export_gguf.run(cfg_for(), art, tmp_path / "gguf-F16")
    tokens = ids[0, :64].tolist()
    got = llama_logits(gg.file, tokens)
    want = logits(reload(art), ids[:, :64])[0].numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.95


# ---------------------------------------------------------------- targets and the solver

SMOLLM2 = Dims(layers=30, hidden=576, heads=9, kv_heads=3, mlp=1536, head_dim=64, vocab=49152,
               tied=True, qkv_bias=False, o_bias=False, mlp_bias=False)


@pytest.mark.parametrize("arch,tie", [("llama", True), ("llama", False), ("qwen2", True)])
def test_param_formula_matches_the_model(arch, tie, tokenizer):
    model = make_tiny(tokenizer, arch=arch, tie=tie, **TINY)
    assert Dims.of(model.config).total() == count_params(model)


def test_solver_half_of_smollm2_shrinks_the_mlp_first():
    want, info = resolve(cfg_for("prune.params=0.5", "prune.multiple=32").prune, SMOLLM2)
    assert want.non_embedding() <= 0.5 * SMOLLM2.non_embedding() < want.non_embedding() * 1.1
    assert (want.layers, want.hidden, want.heads, want.mlp % 32) == (30, 576, 9, 0)
    assert info["target_non_embedding"] == int(0.5 * SMOLLM2.non_embedding())


def test_solver_absolute_target_cuts_kv_groups_past_the_mlp_floor():
    want, _ = resolve(cfg_for("prune.params=60M", "prune.multiple=32").prune, SMOLLM2)
    assert want.total() <= 60e6 and want.heads in (3, 6) and want.kv_heads * 3 == want.heads
    assert want.mlp >= MLP_FLOOR * SMOLLM2.mlp and want.mlp % 32 == 0


def test_solver_keeps_explicit_layers():
    want, _ = resolve(cfg_for("prune.params=0.4", "prune.layers=20", "prune.multiple=32").prune, SMOLLM2)
    assert want.layers == 20 and want.non_embedding() <= 0.4 * SMOLLM2.non_embedding()


def test_parse_params():
    assert parse_params("0.5", SMOLLM2) == ("fraction", 0.5)
    assert parse_params(0.25, SMOLLM2) == ("fraction", 0.25)
    assert parse_params("60M", SMOLLM2) == ("absolute", 60e6)


@pytest.mark.parametrize("overrides,match", [
    (["prune.heads=3"], r"breaks GQA grouping .*valid: 2, 4"),
    (["prune.mlp=1000"], r"outside the teacher's 1\.\.128"),
    (["prune.layers=9"], r"outside the teacher's 1\.\.4"),
    (["prune.hidden=0"], r"outside"),
    (["prune.params=half"], r"not a fraction like 0\.5"),
    (["prune.params=0"], r"must be above 0"),
    (["prune.params=2B"], r"not below the teacher"),
    (["prune.params=1K"], r"below the embedding"),
    (["prune.params=0.5", "prune.mlp=64"], r"both set"),
    (["prune.multiple=0", "prune.mlp=64"], r"multiple"),
    (["prune.layers=2", "prune.depth_metric=loss"], None),      # valid: no error
])
def test_bad_targets_raise_one_line(overrides, match, tokenizer):
    t = Dims.of(make_tiny(tokenizer, arch="llama", **TINY).config)
    if match is None:
        resolve(cfg_for(*overrides).prune, t)
        return
    with pytest.raises(UserError, match=match) as e:
        resolve(cfg_for(*overrides).prune, t)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [["prune.heads=2"], ["prune.hidden=48"], ["prune.heads=2", "prune.hidden=48"]])
def test_qwen2_heads_and_hidden_must_stay_consistent_for_llama_cpp(overrides, tokenizer):
    t = Dims.of(make_tiny(tokenizer, arch="qwen2", **TINY).config)
    with pytest.raises(UserError, match=r"hidden size = heads x head_dim .*prune.hidden=\d+"):
        resolve(cfg_for(*overrides).prune, t)
    want, _ = resolve(cfg_for("prune.heads=2", "prune.hidden=32").prune, t)
    assert (want.heads, want.hidden) == (2, 32)
    want, _ = resolve(cfg_for("prune.params=0.6").prune, t)      # the solver leaves qwen2 heads alone
    assert want.heads == 4 and want.mlp < 128


def test_stage_rejects_bad_input_before_loading(tokenizer, tiny_data, tmp_path):
    with artifacts.writing(tmp_path / "gpt2", stage="teacher", config={}, parents=[], format="hf") as (tmp, meta):
        (tmp / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    other = artifacts.load(tmp_path / "gpt2")
    with pytest.raises(UserError, match=r"prune supports llama, qwen2, qwen3, mistral, phi3, smollm3, gemma3_text models, not 'gpt2'"):
        prune.run(cfg_for("prune.layers=2"), other, tmp_path / "out", data=tiny_data)
    src = save_hf_artifact(tiny(tokenizer, "llama"), tokenizer, tmp_path / "teacher", stage="teacher")
    with pytest.raises(UserError, match=r"did you mean 'block_influence'"):
        prune.run(cfg_for("prune.layers=2", "prune.depth_metric=block_influnce"), src, tmp_path / "out", data=tiny_data)
    with pytest.raises(UserError, match=r"needs a target"):
        prune.run(cfg_for(), src, tmp_path / "out", data=tiny_data)
    assert not prune.has_targets(cfg_for()) and prune.has_targets(cfg_for("prune.params=0.5"))
    assert not (tmp_path / "out").exists()


def test_pipeline_prunes_heals_and_reports_before_and_after(tokenizer, tmp_path):
    """`compress run prune.*=...`: the pruned student replaces the layer subset, is healed by
    distillation, exported, and both the pruned and the healed artifacts appear in the report."""
    import json

    from compress.cli import main
    from compress.models import save_hf
    from conftest import make_tiny
    save_hf(make_tiny(tokenizer, layers=3, intermediate=128, seed=5), tokenizer, tmp_path / "teacher")
    (tmp_path / "data.txt").write_text("\n\n".join(
        f"Paragraph {i}. The river ran past the mill and the miller counted sacks of grain. " * 3 for i in range(40)))
    rc = main(["run", "name=p", f"out={tmp_path / 'runs'}", f"teacher={tmp_path / 'teacher'}",
               f"data={tmp_path / 'data.txt'}", "prune.layers=2", "prune.mlp=64", "prune.multiple=16",
               "distill.tokens=256", "distill.seq_len=32", "distill.batch=2", "quantize.gguf=[Q8_0]",
               "quantize.imatrix_tokens=256", "quantize.teacher=false", "eval.seqs=2", "eval.seq_len=32",
               "eval.prefill_tokens=16", "eval.decode_tokens=4", "eval.threads=1", "eval.memory=false"])
    assert rc == 0
    run = tmp_path / "runs" / "p"
    pruned = json.loads((run / "pruned" / "config.json").read_text())
    assert pruned["num_hidden_layers"] == 2 and pruned["intermediate_size"] == 64
    assert not (run / "student").exists()
    distilled = json.loads((run / "distilled" / "meta.json").read_text())
    assert distilled["parent"] == "pruned"
    report = json.loads((run / "report.json").read_text())
    names = {a["name"]: a for a in report["artifacts"]}
    assert {"teacher", "pruned", "distilled", "gguf-F16", "gguf-Q8_0"} <= set(names)
    assert names["pruned"]["params"] < names["teacher"]["params"]
    assert names["pruned"]["quality"]["kld"] > 0 and names["distilled"]["quality"]["kld"] is not None
