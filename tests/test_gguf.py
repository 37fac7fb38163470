"""GGUF export, importance matrix and llama.cpp quantization, checked in llama.cpp itself.

Tiny random models over the built-in teacher's tokenizer go HF -> GGUF -> llama.cpp; logits on
the same token ids are compared with the HF model's. The permutation test proves the round trip
can fail: without llama.cpp's rotary row order the logits diverge.
"""
from __future__ import annotations

import json

import gguf
import llama_cpp
import numpy as np
import pytest
import torch

from compress import artifacts
from compress.config import load_config
from compress.errors import UserError
from compress.export import gguf as export_gguf
from compress.quantize import gguf as quantize_gguf
from compress.quantize import imatrix as imatrix_stage
from conftest import SHARED, make_tiny, save_data_artifact, save_hf_artifact

TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles "
        "and by opposing end them. To die, to sleep; no more; and by a sleep to say we end the "
        "heart-ache and the thousand natural shocks that flesh is heir to: 'tis a consummation "
        "devoutly to be wish'd. In 1603, 42 players met at <|im_start|> 7 o'clock.")


def cfg_for(*overrides):
    return load_config(["quantize.imatrix_tokens=1024", *overrides])


def llama_logits(path, ids) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for fixed token ids (no BOS added)."""
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) in nats per position, from logits [positions, vocab]."""
    lp = p_logits - np.logaddexp.reduce(p_logits, axis=-1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, axis=-1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max |a - b| relative to b's largest logit, fraction of positions with the same top-1)."""
    return float(np.abs(a - b).max() / np.abs(b).max()), float((a.argmax(-1) == b.argmax(-1)).mean())


@pytest.fixture(scope="module")
def ids(tokenizer):
    out = tokenizer(TEXT)["input_ids"]
    assert len(out) >= 90
    return out


@pytest.fixture(scope="module")
def llama_model(tokenizer):
    return make_tiny(tokenizer, arch="llama")


@pytest.fixture(scope="module")
def exported(llama_model, tokenizer, tmp_path_factory):
    """(HF artifact, F16 GGUF artifact) of the tiny Llama, exported without a teacher."""
    root = tmp_path_factory.mktemp("export")
    src = save_hf_artifact(llama_model, tokenizer, root / "distilled", stage="distill")
    return src, export_gguf.run(cfg_for(), src, root / "gguf-F16")


@pytest.fixture(scope="module")
def calibrated(exported, tmp_path_factory):
    """An importance matrix of the tiny Llama measured on public-domain text."""
    root = tmp_path_factory.mktemp("imatrix")
    path = SHARED / "tiny_shakespeare" / "input.txt"
    paras = [p for p in path.read_text().split("\n\n") if len(p) > 200][:40] if path.exists() else []
    paras = paras or [TEXT] * 20
    data = save_data_artifact(paras, paras[:2], root / "data")
    return imatrix_stage.run(cfg_for(), exported[0], root / "imatrix", data=data)


# ---------------------------------------------------------------- export

def test_f16_round_trip_matches_hf(exported, llama_model, ids):
    _, f16 = exported
    rel, top1 = compare(llama_logits(f16.file, ids), hf_logits(llama_model, ids))
    assert rel < 0.02, f"max logit difference {rel:.4f} of the logit scale"
    assert top1 >= 0.99
    assert f16.meta["quant"] == "F16" and f16.meta["format"] == "gguf"
    assert f16.meta["params"] == sum(p.numel() for p in llama_model.parameters())
    ident = export_gguf.run.stage.identity(cfg_for(), exported[0])
    assert artifacts.find_done(f16.path, ident.hash)


def test_round_trip_fails_without_qk_permutation(llama_model, tokenizer, ids, tmp_path, monkeypatch):
    src = save_hf_artifact(llama_model, tokenizer, tmp_path / "hf")
    monkeypatch.setattr(export_gguf, "permute_qk", lambda w, n_head: w)
    bad = export_gguf.run(cfg_for(), src, tmp_path / "gguf")
    rel, top1 = compare(llama_logits(bad.file, ids), hf_logits(llama_model, ids))
    assert rel > 0.1 and top1 < 0.9, (rel, top1)


# BF16 keeps 8 mantissa bits (F16: 11), so near-tied top-1 tokens may swap.
@pytest.mark.parametrize("qtype, want, max_rel, min_top1", [("BF16", "BF16", 0.05, 0.9), ("F32", "F32", 0.01, 0.99)])
def test_other_unquantized_types(llama_model, tokenizer, ids, tmp_path, qtype, want, max_rel, min_top1):
    src = save_hf_artifact(llama_model, tokenizer, tmp_path / "hf")
    art = export_gguf.run(cfg_for(f"export.gguf={qtype}"), src, tmp_path / "gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(art.file)).tensors}
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == "F32"
    assert art.meta["quant"] == qtype and art.meta["metrics"]["tensor_types"][want] > 0
    rel, top1 = compare(llama_logits(art.file, ids), hf_logits(llama_model, ids))
    assert rel < max_rel and top1 >= min_top1, (rel, top1)


def read_gguf(path) -> tuple[dict, list[str]]:
    """(metadata fields by key, tensor names) of a GGUF file."""
    reader = gguf.GGUFReader(str(path))
    return dict(reader.fields), [t.name for t in reader.tensors]


def test_metadata_from_hf_tokenizer(exported, tokenizer):
    _, f16 = exported
    fields, tensors = read_gguf(f16.file)
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"     # the HF tokenizer is plain byte-level
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert len(fields["tokenizer.ggml.tokens"].data) == len(tokenizer)
    assert len(fields["tokenizer.ggml.merges"].data) > 1000
    assert fields["llama.block_count"].contents() == 2
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["general.file_type"].contents() == 1
    assert "output.weight" not in tensors and "token_embd.weight" in tensors    # tied embeddings
    modelfile = (f16.path / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and "TEMPLATE" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "warnings" not in f16.meta["metrics"]
    # llama.cpp tokenizes like HF, special tokens included
    llm = llama_cpp.Llama(str(f16.file), vocab_only=True, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == tokenizer(TEXT)["input_ids"]


def test_tokenizer_copied_from_teacher_gguf(tokenizer, teacher_gguf, tmp_path):
    with artifacts.writing(tmp_path / "teacher", stage="teacher", config={}, parents=[], format="hf") as (tmp, meta):
        meta["metrics"] = {"source_gguf": str(teacher_gguf)}
    teacher = artifacts.load(tmp_path / "teacher")
    src = save_hf_artifact(make_tiny(tokenizer, tie=False), tokenizer, tmp_path / "hf")
    art = export_gguf.run(cfg_for(), src, tmp_path / "gguf", teacher=teacher)
    fields, tensors = read_gguf(art.file)
    want, _ = read_gguf(teacher_gguf)
    keys = sorted(k for k in want if k.startswith("tokenizer."))
    assert keys == sorted(k for k in fields if k.startswith("tokenizer."))
    for k in keys:
        assert fields[k].contents() == want[k].contents(), k
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "output.weight" in tensors                               # untied: own output layer
    assert [p["name"] for p in art.meta["parents"]] == ["hf", "teacher"]
    assert art.meta["metrics"]["tokenizer"] == "teacher gguf"


def test_qwen2_round_trip(tokenizer, ids, tmp_path):
    model = make_tiny(tokenizer, arch="qwen2")
    src = save_hf_artifact(model, tokenizer, tmp_path / "hf")
    art = export_gguf.run(cfg_for(), src, tmp_path / "gguf")
    fields, tensors = read_gguf(art.file)
    assert fields["general.architecture"].contents() == "qwen2" and "blk.0.attn_q.bias" in tensors
    rel, top1 = compare(llama_logits(art.file, ids), hf_logits(model, ids))
    assert rel < 0.02 and top1 >= 0.99


def test_llama3_rope_scaling_round_trip(tokenizer, ids, tmp_path):
    """Llama 3.1-style scaled rope travels as llama.cpp's rope_freqs tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64, "rope_theta": 500000.0})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    src = save_hf_artifact(model, tokenizer, tmp_path / "hf")
    art = export_gguf.run(cfg_for(), src, tmp_path / "gguf")
    assert "rope_freqs.weight" in read_gguf(art.file)[1]
    rel, top1 = compare(llama_logits(art.file, ids), hf_logits(model, ids))
    assert rel < 0.02 and top1 >= 0.99, (rel, top1)


def spm_style_tokenizer(text: str):
    """A small Llama-2-style tokenizer: byte-fallback BPE over '▁'-joined words, BOS added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(text.splitlines(), trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                                        limit_alphabet=60, show_progress=False))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                      special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_spm_style_tokenizer_matches_hf(tmp_path):
    path = SHARED / "tiny_shakespeare" / "input.txt"
    text = path.read_text()[:100_000] if path.exists() else (TEXT + "\n") * 200
    tok = spm_style_tokenizer(text)
    src = save_hf_artifact(make_tiny(tok), tok, tmp_path / "hf")
    art = export_gguf.run(cfg_for(), src, tmp_path / "gguf")
    fields, _ = read_gguf(art.file)
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    llm = llama_cpp.Llama(str(art.file), vocab_only=True, verbose=False)
    samples = [p for p in (text[-20_000:] if path.exists() else TEXT).split("\n\n") if p.strip()][:50]
    for s in samples + ["Bytes: ünïcode → 日本, 1603", "  two  spaces\nnew line"]:
        assert llm.tokenize(s.encode(), add_bos=True) == tok(s)["input_ids"], s


def test_unsupported_architecture_names_supported(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=64))
    with artifacts.writing(tmp_path / "gpt2", stage="student", config={}, parents=[], format="hf") as (tmp, _):
        model.save_pretrained(tmp)
    with pytest.raises(UserError, match="gpt2.*supports: llama, qwen2, qwen3, mistral"):
        export_gguf.run(cfg_for(), artifacts.load(tmp_path / "gpt2"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_pre_tokenizer_records_warning(llama_model, tokenizer, tmp_path):
    sig = export_gguf._pre_signature({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]})
    assert export_gguf.PRE_TOKENIZERS[sig] == "smollm"
    src = save_hf_artifact(llama_model, tokenizer, tmp_path / "hf")
    tj = json.loads((src.path / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": False}, tj["pre_tokenizer"]]}    # in no table
    (src.path / "tokenizer.json").write_text(json.dumps(tj))
    art = export_gguf.run(cfg_for(), src, tmp_path / "gguf")
    fields, _ = read_gguf(art.file)
    assert fields["tokenizer.ggml.pre"].contents() == "default"
    assert "pre-tokenizer" in art.meta["metrics"]["warnings"][0]


# ---------------------------------------------------------------- imatrix and quantization

def test_imatrix_keys_are_gguf_matrices(exported, calibrated):
    _, f16 = exported
    matrix = dict(np.load(calibrated.file))
    shapes = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(str(f16.file)).tensors}
    assert set(matrix) == {n for n, s in shapes.items() if len(s) == 2}    # incl. tied token_embd
    for name, values in matrix.items():
        assert values.shape == (shapes[name][0],) and np.all(values > 0), name     # [in_features]
    assert calibrated.meta["metrics"] == {"tokens": 1024, "tensors": len(matrix)}
    assert calibrated.meta["config"] == {"quantize.imatrix_tokens": 1024}


# Random Gaussian weights have no structure for 4 bits to keep, so Q4_0 drifts far more here
# than on trained models; Q8_0 must stay close (measured: KL 0.003, Q4_0 0.3 nats/token).
@pytest.mark.parametrize("qtype, max_kld", [("Q8_0", 0.01), ("Q4_0", 0.5)])
def test_quantize_with_imatrix(exported, calibrated, ids, tmp_path, capfd, qtype, max_kld):
    _, f16 = exported
    art = quantize_gguf.run(cfg_for(), f16, tmp_path / f"gguf-{qtype}", qtype=qtype, imatrix=calibrated)
    assert art.meta["size_bytes"] < f16.meta["size_bytes"]
    m = art.meta["metrics"]
    assert m["imatrix"] is True and m["tensors"]["blk.0.attn_q.weight"] == qtype
    assert m["tensors"]["blk.0.attn_norm.weight"] == "F32" and sum(m["tensor_types"].values()) == len(m["tensors"])
    assert m["fallbacks"] == (1 if qtype == "Q4_0" else 0)     # tied output wants Q6_K; width 64 < 256
    assert art.meta["config"] == {"qtype": qtype}    # the imatrix (1024 tokens) is a parent
    ident = quantize_gguf.run.stage.identity(cfg_for(), f16, qtype=qtype, imatrix=calibrated)
    assert artifacts.find_done(art.path, ident.hash)   # the pipeline's resume check finds it
    assert [p["name"] for p in art.meta["parents"]] == ["gguf-F16", "imatrix"]
    assert (art.path / "Modelfile").read_text() == (f16.path / "Modelfile").read_text()
    assert "importance matrix" in (art.path / "quantize.log").read_text()
    assert "llama_model_quantize" not in capfd.readouterr().err     # llama.cpp's log stays in the file
    ref = llama_logits(f16.file, ids)
    got = kld(ref, llama_logits(art.file, ids))
    print(f"{qtype} with imatrix: KL to F16 {got:.4f} nats/token")
    assert got < max_kld
    assert kld(ref, np.roll(ref, 1, axis=0)) > 4 * max_kld      # the bound is far below unrelated logits


def test_imatrix_changes_q4_0(exported, calibrated, ids, tmp_path):
    _, f16 = exported
    with_im = quantize_gguf.run(cfg_for(), f16, tmp_path / "with", qtype="Q4_0", imatrix=calibrated)
    without = quantize_gguf.run(cfg_for(), f16, tmp_path / "without", qtype="Q4_0")
    assert without.meta["metrics"]["imatrix"] is False and [p["name"] for p in without.meta["parents"]] == ["gguf-F16"]
    assert with_im.meta["metrics"]["tensors"] == without.meta["metrics"]["tensors"]
    assert with_im.file.read_bytes() != without.file.read_bytes()
    # Weighting rounding errors by activation energy keeps the output closer (measured 0.27 vs 0.30).
    ref = llama_logits(f16.file, ids)
    assert kld(ref, llama_logits(with_im.file, ids)) < kld(ref, llama_logits(without.file, ids))


def test_quantize_error_is_one_line_and_leaves_nothing(exported, tmp_path):
    _, f16 = exported
    with artifacts.writing(tmp_path / "imatrix", stage="imatrix", config={"imatrix_tokens": 1},
                           parents=[], format="imatrix", file="imatrix.npz") as (tmp, _):
        np.savez(tmp / "imatrix.npz", **{"blk.0.attn_q.weight": np.ones(7, np.float32)})    # wrong width
    bad = artifacts.load(tmp_path / "imatrix")
    with pytest.raises(UserError, match="imatrix size 7 is different"):
        quantize_gguf.run(cfg_for(), f16, tmp_path / "out", qtype="Q4_0", imatrix=bad)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(UserError, match="unknown quantized GGUF type Q4_X"):
        quantize_gguf.run(cfg_for(), f16, tmp_path / "out", qtype="Q4_X")


def test_modelfile_without_chatml(tmp_path):
    from compress.export.modelfile import write_modelfile
    text = write_modelfile(tmp_path, "{{ bos_token }}[INST] {{ m }} [/INST]", ["</s>"]).read_text()
    assert not any(ln.startswith("TEMPLATE") for ln in text.splitlines()) and 'PARAMETER stop "</s>"' in text
    assert json.loads(text.splitlines()[-1].split(" ", 2)[2]) == "</s>"
