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
from compress.student.subset import keep_layers
from conftest import make_tiny, save_hf_artifact

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Where there is a will, there is a way. ") * 8
FAMILIES = list(ARCHS)


def tiny(tokenizer, arch: str, layers: int = 3):
    return make_tiny(tokenizer, arch=arch, layers=layers)


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
    student = keep_layers(tiny(tokenizer, arch, layers=4), [0, 3])
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
    cut = ["prune.layers=2", "prune.mlp=64", "prune.heads=2"] + (["prune.hidden=32"] if ARCHS[arch].q_is_hidden else [])
    pruned = prune.run(load_config(cut), src, tmp_path / "pruned", data=tiny_data)
    conf = json.loads((pruned.path / "config.json").read_text())
    assert (conf["num_hidden_layers"], conf["intermediate_size"], conf["num_attention_heads"]) == (2, 64, 2)
    reloaded = load_model(str(pruned.path))
    art = export_gguf.run(load_config([]), pruned, tmp_path / "pruned-gguf")
    kld, top1 = kld_top1(hf_logprobs(reloaded, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert kld <= 1e-3 and top1 >= 0.99, (arch, kld, top1)


def test_an_unsupported_family_is_one_line_naming_the_supported_ones():
    with pytest.raises(UserError, match="unsupported architecture 'bert'; GGUF export supports: llama, qwen2, qwen3, mistral"):
        arch_of("bert", "GGUF export")


@pytest.mark.parametrize("arch", FAMILIES)
def test_bitsandbytes_int8_loads_quantized_and_tracks_the_model(arch, tokenizer, ids, tmp_path):
    from compress.quantize import bnb
    model = tiny(tokenizer, arch, layers=2)
    src = save_hf_artifact(model, tokenizer, tmp_path / arch)
    art = bnb.run(load_config(["quantize.bnb=[int8]"]), src, tmp_path / "bnb-int8", qtype="int8")
    assert art.meta["metrics"]["linear_layers"] == 14    # 2 layers x (q, k, v, o, gate, up, down)
    kld, top1 = kld_top1(hf_logprobs(model, ids), runtime_logprobs(art, ids, len(tokenizer)))
    assert 0 < kld < 0.1 and top1 > 0.8, (arch, kld, top1)


def test_keep_layers_keeps_each_layers_own_per_layer_entries(tokenizer):
    model = tiny(tokenizer, "qwen3", layers=4)
    model.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model.config.no_rope_layers = [1, 0, 1, 1]
    student = keep_layers(model, [1, 3])
    assert student.config.layer_types == ["sliding_attention", "sliding_attention"]
    assert student.config.no_rope_layers == [0, 1]
