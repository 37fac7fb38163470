"""Every family of the architecture table (compress/archs.py) through every stage, on tiny random
models built from each family's real config class: GGUF export (llama.cpp vs HF), ONNX export
(onnxruntime vs HF), a layer-subset student and structured pruning read back by llama.cpp."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compress.archs import ARCHS, arch_of
from compress.config import load_config
from compress.errors import UserError
from compress.evaluate.runtimes import open_runtime
from compress.export import gguf as export_gguf
from compress.student import prune
from compress.student.subset import keep_layers, keep_rope_pattern
from conftest import make_tiny, save_hf_artifact

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Where there is a will, there is a way. ") * 8
FAMILIES = list(ARCHS)


# Per family, what makes the tiny model use its features: Phi-3's pretraining context equal to its
# positions (plain rope; LongRoPE has its own test).
EXTRA = {"phi3": {"original_max_position_embeddings": 512, "pad_token_id": 0}, "smollm3": {"pad_token_id": 0}}


def tiny(tokenizer, arch: str, layers: int = 3, **extra):
    if ARCHS[arch].rope_every:   # enough layers for one without rope (SmolLM3: the 4th)
        layers = max(layers, ARCHS[arch].rope_every + 1)
    if ARCHS[arch].sliding:      # Gemma 3: sliding and full layers alternate, a window the test sequences exceed
        extra = {"sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)
                 + ["sliding_attention"] * (layers % 2)} | extra
    return make_tiny(tokenizer, arch=arch, layers=layers, **(EXTRA.get(arch, {}) | extra))


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(TEXT, add_special_tokens=False)["input_ids"][:256]   # one near-tie flip stays under 1 %


def hf_logprobs(model, ids) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def runtime_logprobs(art, ids, vocab) -> np.ndarray:
    rt = open_runtime(art, 1, vocab=vocab, n_ctx=len(ids) + 8)
    try:
        return rt.logprobs(ids)
    finally:
        rt.close()


def kld_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(ref || got), and top-1 agreement where ref's first choice leads by at least 0.01
    nats: random tiny models have near-ties that F16 rounding alone flips (KLD ~1e-6 there)."""
    kld = float((np.exp(ref) * (ref - got)).sum(-1).mean())
    top2 = np.sort(ref, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] >= 0.01
    return kld, float((ref.argmax(-1) == got.argmax(-1))[decided].mean())


def gguf_of(model, tokenizer, root, name):
    # The directory name becomes general.name, and llama.cpp looks for Phi-3's own special tokens
    # in any model whose name says phi3: these tiny models carry the SmolLM2 vocabulary instead.
    name = name.replace("phi3", "tiny")
    src = save_hf_artifact(model, tokenizer, root / name)
    return export_gguf.run(load_config([]), src, root / f"{name}-gguf")


@pytest.mark.parametrize("arch", FAMILIES)
def test_gguf_f16_matches_hf(arch, tokenizer, ids, tmp_path):
    model = tiny(tokenizer, arch)
    art = gguf_of(model, tokenizer, tmp_path, arch)
    kld, top1 = kld_top1(hf_logprobs(model, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert kld <= 1e-3 and top1 >= 0.99, (arch, kld, top1)
    if ARCHS[arch].qk_norm:   # the per-head norms travel under llama.cpp's names
        import gguf
        names = {t.name for t in gguf.GGUFReader(str(art.file)).tensors}
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names


@pytest.mark.parametrize("arch", [a for a in FAMILIES if ARCHS[a].onnx])
def test_onnx_fp32_matches_hf(arch, tokenizer, ids, tmp_path):
    from compress.export import onnx as export_onnx
    model = tiny(tokenizer, arch, layers=2)
    src = save_hf_artifact(model, tokenizer, tmp_path / arch)
    art = export_onnx.run(load_config(["export.onnx=fp32"]), src, tmp_path / "onnx")
    kld, top1 = kld_top1(hf_logprobs(model, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert kld <= 1e-4 and top1 >= 0.99, (arch, kld, top1)


@pytest.mark.parametrize("arch", FAMILIES)
def test_layer_subset_student_runs_in_llama_cpp(arch, tokenizer, ids, tmp_path):
    teacher = tiny(tokenizer, arch, layers=4)
    student = keep_layers(teacher, keep_rope_pattern(teacher.config, [0, 3], None))
    assert student.config.num_hidden_layers == 2
    art = gguf_of(student, tokenizer, tmp_path, arch)
    kld, top1 = kld_top1(hf_logprobs(student, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert kld <= 1e-3 and top1 >= 0.99, (arch, kld, top1)


@pytest.mark.parametrize("arch", [a for a in FAMILIES if ARCHS[a].prune])
def test_pruning_keeps_all_exactly_and_a_pruned_model_runs_in_llama_cpp(arch, tokenizer, tiny_data, ids, tmp_path):
    model = tiny(tokenizer, arch)
    src = save_hf_artifact(model, tokenizer, tmp_path / "teacher", stage="teacher")
    c = model.config
    keep_all = [f"prune.layers={c.num_hidden_layers}", f"prune.mlp={c.intermediate_size}",
                f"prune.heads={c.num_attention_heads}", f"prune.hidden={c.hidden_size}"]
    same = prune.run(load_config(keep_all), src, tmp_path / "same", data=tiny_data)
    from compress.models import load_model
    assert np.array_equal(hf_logprobs(load_model(str(same.path)), ids), hf_logprobs(model, ids))
    # heads halved (one of two KV groups) and the MLP narrowed; hidden kept where llama.cpp needs it
    # the hidden width too: 2 heads x head_dim where llama.cpp needs that (q_is_hidden), else 48
    cut = ["prune.layers=2", "prune.mlp=64", "prune.heads=2", "prune.multiple=16",
           f"prune.hidden={32 if ARCHS[arch].q_is_hidden else 48}"]
    pruned = prune.run(load_config(cut), src, tmp_path / "pruned", data=tiny_data)
    conf = json.loads((pruned.path / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["intermediate_size"], conf["num_attention_heads"]) == (2, 64, 2)
    reloaded = load_model(str(pruned.path))
    art = export_gguf.run(load_config([]), pruned, tmp_path / "pruned-gguf")
    kld, top1 = kld_top1(hf_logprobs(reloaded, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert kld <= 1e-3 and top1 >= 0.99, (arch, kld, top1)


def test_an_unsupported_family_is_one_line_naming_the_supported_ones():
    with pytest.raises(UserError, match="unsupported architecture 'bert'; GGUF export supports: llama, qwen2, qwen3, "
                                        "mistral, phi3, smollm3, gemma3_text"):
        arch_of("bert", "GGUF export")


def test_phi3_longrope_and_partial_rotary_travel_to_llama_cpp(tokenizer, ids, tmp_path):
    """Phi-3.5/4-mini style: LongRoPE factors (short ones used within the original context, in both
    runtimes) with HF's attention factor, and rope on 3/4 of each head (Phi-4-mini)."""
    rng = np.random.default_rng(0)
    d = 64 // 4
    rot = int(d * 0.75)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 256,
            "short_factor": (1 + rng.random(rot // 2)).tolist(), "long_factor": (1 + 4 * rng.random(rot // 2)).tolist()}
    model = make_tiny(tokenizer, arch="phi3", layers=2, original_max_position_embeddings=256, pad_token_id=0,
                      rope_parameters=rope)
    art = gguf_of(model, tokenizer, tmp_path, "phi3-longrope")
    short = ids[:200]                      # within the original 256 positions: short factors
    ref = hf_logprobs(model, short)
    kld, top1 = kld_top1(ref, runtime_logprobs(art, short, len(tokenizer)))
    assert kld <= 1e-3 and top1 >= 0.99, (kld, top1)
    import gguf
    r = gguf.GGUFReader(str(art.file))
    assert int(r.fields["phi3.rope.dimension_count"].contents()) == rot
    assert {"rope_factors_long.weight", "rope_factors_short.weight"} <= {t.name for t in r.tensors}


@pytest.mark.parametrize("arch", FAMILIES)
def test_bitsandbytes_int8_loads_quantized_and_tracks_the_model(arch, tokenizer, ids, tmp_path):
    from compress.quantize import bnb
    model = tiny(tokenizer, arch, layers=2)
    src = save_hf_artifact(model, tokenizer, tmp_path / arch)
    art = bnb.run(load_config(["quantize.bnb=[int8]"]), src, tmp_path / "bnb-int8", qtype="int8")
    linear = sum(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    assert art.meta["metrics"]["linear_layers"] == linear    # every projection, fused ones as one
    kld, top1 = kld_top1(hf_logprobs(model, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert 0 < kld < 0.1 and top1 > 0.8, (arch, kld, top1)


def test_keep_layers_keeps_each_layers_own_per_layer_entries(tokenizer):
    model = tiny(tokenizer, "qwen3", layers=4)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model.config.no_rope_layers = [1, 0, 1, 1]
    student = keep_layers(model, [1, 3])
    assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert student.config.no_rope_layers == [0, 1]


def test_smollm3_subset_keeps_the_rope_pattern_llama_cpp_derives(tokenizer):
    """SmolLM3 has no rope on every 4th layer and llama.cpp derives that from the index: the kept
    layers must follow it. Among the subsets that do, the one with the most importance is kept
    (checked against brute force)."""
    import itertools
    from compress.archs import ARCHS, rope_pattern
    model = tiny(tokenizer, "smollm3", layers=8)
    has = [int(x) for x in model.config.no_rope_layers]
    assert has == rope_pattern(ARCHS["smollm3"], 8) == [1, 1, 1, 0, 1, 1, 1, 0]
    scores = [0.9, 0.1, 0.5, 0.8, 0.2, 0.7, 0.3, 0.6]
    for k in range(1, 8):
        top = sorted(sorted(range(8), key=lambda i: -scores[i])[:k])
        got = keep_rope_pattern(model.config, top, scores)
        need = rope_pattern(ARCHS["smollm3"], k)
        assert [has[i] for i in got] == need, (k, got)
        best = max((c for c in itertools.combinations(range(8), k) if [has[i] for i in c] == need),
                   key=lambda c: sum(scores[i] for i in c))
        assert sum(scores[i] for i in got) == pytest.approx(sum(scores[i] for i in best)), (k, got, best)
    student = keep_layers(model, keep_rope_pattern(model.config, [0, 1, 2, 3, 4], None))
    assert student.config.no_rope_layers == [1, 1, 1, 0, 1]


def test_smollm3_file_whose_rope_layers_break_the_pattern_is_refused(tokenizer, tmp_path):
    bad = keep_layers(tiny(tokenizer, "smollm3", layers=4), [0, 3])     # [1, 0]: llama.cpp would rope both
    src = save_hf_artifact(bad, tokenizer, tmp_path / "hf")
    with pytest.raises(UserError, match=r"llama.cpp applies rope by layer index in smollm3 .* no_rope_layers is \[1, 0\]"):
        export_gguf.run(load_config([]), src, tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_onnx_export_of_a_family_the_builder_cannot_take_is_one_line(tokenizer, tmp_path):
    from compress.export import onnx as export_onnx
    src = save_hf_artifact(tiny(tokenizer, "smollm3"), tokenizer, tmp_path / "hf")
    with pytest.raises(UserError, match="ONNX export supports llama, qwen2, qwen3, mistral, phi3, not 'smollm3'"):
        export_onnx.run(load_config(["export.onnx=fp32"]), src, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("arch", [a for a in FAMILIES if a != "llama"])   # llama: test_end_to_end.py
def test_phone_run_of_each_family_reaches_the_report(arch, tokenizer, tmp_path):
    """`compress run profile=phone teacher=<dir>` on a saved tiny model of each family: every GGUF
    (and ONNX, where the builder takes the family) artifact scored in its runtime, in the report."""
    import subprocess
    import sys
    from pathlib import Path
    teacher = tmp_path / "teacher-src"
    model = tiny(tokenizer, arch)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}. " * 4})
                              for i in range(24)))
    onnx = ["export.onnx=fp32"] if ARCHS[arch].onnx else []
    args = ["run", "profile=phone", f"teacher={teacher}", f"data={data}", "name=r", f"out={tmp_path}",
            "student.layers=2", "distill.tokens=128", "distill.seq_len=32", "distill.batch=2",
            "quantize.gguf=[Q8_0,auto:50%]", "quantize.imatrix_tokens=128", "quantize.mix_tokens=128",
            "eval.seqs=2", "eval.seq_len=32", "eval.prefill_tokens=8",
            "eval.decode_tokens=4", "eval.threads=1", "eval.tasks=[]", "eval.memory=false", "eval.ood=none",
            "samples.prompts=1", "samples.tokens=4", "quantize.teacher=false", "preflight=false",
            "qad.of=[student]", "qad.tokens=64", "qad.seq_len=32", *onnx]
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    # Q8_0 and the auto mix: the family's importance matrix and sensitivity name every matrix
    # the profile's Q4_0 tuned for the student: the family's matrices map onto the file's blocks
    want = {"teacher", "student", "distilled", "gguf-F16", "gguf-Q8_0", "gguf-auto-50pct", "gguf-Q4_0",
            "gguf-Q4_0-qad"}
    want |= {"onnx-fp32"} if onnx else set()
    assert want <= set(arts), sorted(arts)
    for name in want:
        assert arts[name]["evaluated"] and arts[name]["quality"]["kld"] is not None, name
    assert arts["gguf-Q8_0"]["runtime"] == "llama.cpp" and arts["teacher"]["quality"]["kld"] < 1e-3
    assert abs(arts["gguf-F16"]["quality"]["kld"] - arts["distilled"]["quality"]["kld"]) < 1e-2   # the same model


def sentencepiece_tokenizer(tmp_path, kind: str):
    """A small byte-fallback BPE trained with the sentencepiece package, loaded by transformers as
    the family's own tokenizer class (Gemma, Llama 2 / Phi-3 style), as a hub model ships it."""
    spm = pytest.importorskip("sentencepiece")
    from pathlib import Path
    from transformers import AutoTokenizer
    from conftest import SHARED
    path = SHARED / "tiny_shakespeare" / "input.txt"
    text = path.read_text()[:200_000] if path.exists() else (TEXT + "\n") * 400
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=800, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3, split_digits=True,
        add_dummy_prefix=kind == "LlamaTokenizer", normalization_rule_name="identity",   # as Llama 2, Phi-3 and Gemma
        remove_extra_whitespaces=False, minloglevel=2)
    d = Path(tmp_path / "tok")
    d.mkdir()
    (d / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": kind, "bos_token": "<s>", "eos_token": "</s>",
                                                         "unk_token": "<unk>", "pad_token": "<pad>"}))
    return AutoTokenizer.from_pretrained(str(d)), text, spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


@pytest.mark.parametrize("arch,kind", [("gemma3_text", "GemmaTokenizer"), ("phi3", "LlamaTokenizer")])
def test_sentencepiece_vocabulary_tokenizes_in_llama_cpp_as_in_hf(arch, kind, tmp_path):
    import llama_cpp
    tok, text, sp = sentencepiece_tokenizer(tmp_path, kind)
    model = tiny(tok, arch, layers=2)
    art = gguf_of(model, tok, tmp_path, arch)
    llm = llama_cpp.Llama(str(art.file), vocab_only=True, verbose=False)
    samples = [p for p in text[-20_000:].split("\n\n") if p.strip()][:40]
    for s in samples + ["Bytes: ünïcode → 日本, 1603", "  two  spaces\nnew line"]:
        # the reference is sentencepiece itself: transformers' converted Llama tokenizer drops one
        # leading space where two begin a text (it agrees everywhere else, checked below)
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == sp.encode(s), s
        if not s.startswith("  "):
            assert sp.encode(s) == [i for i in tok(s)["input_ids"] if i != tok.bos_token_id], s
    ids = tok(samples[0])["input_ids"][:64]
    kld, top1 = kld_top1(hf_logprobs(model, ids), runtime_logprobs(art, ids, len(tok)))
    assert kld <= 1e-3, (arch, kld)
