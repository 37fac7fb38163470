"""K-quants in quantization-aware distillation: Q4_K and Q6_K blocks as llama.cpp writes them,
unpacked to gguf-py's values and packed back byte for byte; the Gridded layer trains on exactly the
values the file will hold; a tuned Q4_K_M file runs in llama.cpp as the torch model computed it,
with lower KLD than llama.cpp's own Q4_K_M on held-out tokens."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize

from compress.quantize import blocks, kquants, qad
from compress.quantize.kquants import KBlocks
from compress.quantize.mix import ggml_quantize
from compress.quantize.tune import Gridded
from test_qad import file_model, heldout_ids, llama_logprobs, tiny_tuned, torch_logprobs

KTYPES = tuple(kquants.LAYOUT)


def llama_cpp_blocks(qtype: str, imatrix: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(weights, llama.cpp's blocks of them): 8 rows of 512, the first all zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    x[0] = 0
    im = rng.uniform(0.1, 10, 512).astype(np.float32) if imatrix else None
    return x, ggml_quantize(x, qtype, im)


@pytest.mark.parametrize("imatrix", [False, True])
@pytest.mark.parametrize("qtype", KTYPES)
def test_llama_cpps_k_quant_blocks_unpack_to_ggufs_values_and_pack_back_byte_for_byte(qtype, imatrix):
    _, raw = llama_cpp_blocks(qtype, imatrix)
    b = blocks.unpack(raw, qtype, 512)
    assert np.array_equal(b.values(), dequantize(raw, GGMLQuantizationType[qtype]))
    assert np.array_equal(blocks.pack(b), raw)
    (lo, hi), (slo, shi) = b.code_range(), b.scale_range()
    assert lo <= b.q.min() and b.q.max() <= hi and slo <= b.sc.min() and b.sc.max() <= shi
    assert b.q.shape == (8, 512 // kquants.LAYOUT[qtype][1], kquants.LAYOUT[qtype][1])


@pytest.mark.parametrize("qtype", KTYPES)
def test_new_k_quant_scales_and_mins_are_what_the_dequantizer_reads(qtype):
    _, raw = llama_cpp_blocks(qtype, False, seed=1)
    b = blocks.unpack(raw, qtype, 512)
    rng = np.random.default_rng(2)
    lo, hi = b.scale_range()
    b.D = (b.D * rng.uniform(0.8, 1.2, b.D.shape)).astype(np.float32)
    b.sc = np.clip(b.sc + rng.integers(-3, 4, b.sc.shape), lo, hi).astype(np.int16)
    if b.Dmin is not None:
        b.Dmin = (b.Dmin * rng.uniform(0.8, 1.2, b.Dmin.shape)).astype(np.float32)
        b.mn = np.clip(b.mn + rng.integers(-3, 4, b.mn.shape), 0, hi).astype(np.int16)
    got = dequantize(blocks.pack(b), GGMLQuantizationType[qtype])
    r16 = lambda x: None if x is None else x.astype(np.float16).astype(np.float32)   # noqa: E731
    want = KBlocks(qtype, b.q, r16(b.D), b.sc, r16(b.Dmin), b.mn).values()
    assert np.array_equal(got, want)
    b.sc[1, 0] = hi + 1
    with pytest.raises(ValueError, match=rf"sub-block scales must lie in \[{lo}, {hi}\]"):
        blocks.pack(b)
    if b.mn is not None:
        b.sc[1, 0], b.mn[1, 0] = hi, -1
        with pytest.raises(ValueError, match=rf"{qtype} sub-block mins must lie in \[0, {hi}\]"):
            blocks.pack(b)


def gridded(b: KBlocks) -> Gridded:
    t = lambda x: None if x is None else torch.from_numpy(np.ascontiguousarray(x))   # noqa: E731
    return Gridded(t(b.q.astype(np.int8)), t(b.d), t(b.m), None, (t(b.D), t(b.Dmin), b.scale_range()))


def repacked(b: KBlocks, layer: Gridded) -> KBlocks:
    D, sc, Dmin, mn = (None if x is None else x.detach().numpy() for x in layer.ints())
    return KBlocks(b.qtype, b.q, D, sc.astype(np.int16), Dmin, None if mn is None else mn.astype(np.int16))


def fit(layer: Gridded, target: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr * layer.lr_scale)
    for _ in range(steps):
        loss = (layer.weight - target).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("qtype", KTYPES)
def test_the_gridded_layer_starts_at_the_file_and_ends_on_its_grid(qtype):
    """A K-quant layer fitted to the unquantized weights: it starts at exactly the file's values;
    its sub-block scales train and are snapped onto the grid; it ends closer to the weights than
    llama.cpp's blocks, at values the file holds exactly."""
    x, raw = llama_cpp_blocks(qtype, True, seed=3)
    b = blocks.unpack(raw, qtype, 512)
    layer = gridded(b)
    target = torch.from_numpy(x)
    assert torch.equal(layer.weight, torch.from_numpy(b.values()))
    before = (layer.weight - target).square().sum().item()
    fit(layer, target, 60, 0.005)
    with pytest.raises(RuntimeError, match="snap"):
        layer.ints()
    layer.snap()
    assert not any(p.requires_grad for p in layer.parameters())
    after = (layer.weight - target).square().sum().item()
    nb = repacked(b, layer)
    assert np.array_equal(dequantize(blocks.pack(nb), GGMLQuantizationType[qtype]), layer.weight.detach().numpy())
    assert (nb.sc != b.sc).any() and not np.array_equal(nb.D, b.D)
    assert after < before
    untrained = gridded(b)
    untrained.snap()                     # the file's own scales are on the grid: snapped, they stay
    assert torch.equal(untrained.weight, torch.from_numpy(b.values()))


def test_a_super_block_the_file_zeroed_gets_a_scale_when_its_trained_scales_are_not_zero():
    _, raw = llama_cpp_blocks("Q4_K", False)
    b = blocks.unpack(raw, "Q4_K", 512)
    assert (b.D[0] == 0).all()                           # the zero row
    layer = gridded(b)
    with torch.no_grad():
        layer.d0[0] = 0.01                               # as if its scales had trained away from 0
    layer.snap()
    D, sc, _, _ = layer.ints()
    assert (D[0] > 0).all() and torch.allclose(D[0].repeat_interleave(8) * sc[0], torch.full((16,), 0.01), rtol=0.02)


@pytest.fixture(scope="module")
def tuned_k(tmp_path_factory, tokenizer):
    """A tiny teacher 256 wide (k-quants need 256 columns) with a 384-wide MLP, so that ffn_down
    falls back to Q5_0 / Q8_0 as in most models' Q4_K_M; llama.cpp's Q4_K_M of it with an
    importance matrix, and that file tuned."""
    _, teacher, data, plain, art = tiny_tuned(tmp_path_factory.mktemp("qad-k"), tokenizer, "Q4_K_M",
                                              hidden=256, intermediate=384, seed=7)
    return teacher, data, plain, art


def test_a_tuned_q4_k_m_keeps_codes_and_tunes_both_k_quants(tuned_k):
    from compress.quantize.header import tensors_of
    _, _, plain, art = tuned_k
    m = art.meta["metrics"]
    assert {"Q4_K", "Q6_K"} <= set(m["tuned_types"]) and {"Q4_K", "Q6_K"} < set(m["tuned_types"])
    assert m["tuned_tensors"] == 14
    assert set(m["kept_tensors"]) == {"token_embd.weight"} and m["shipped"] == "tuned"
    assert art.file.stat().st_size == plain.file.stat().st_size
    a, b = tensors_of(plain.file), tensors_of(art.file)
    for name, t in a.items():
        if name == "token_embd.weight" or t.type not in blocks.TUNABLE:
            assert np.array_equal(t.data, b[name].data), name
            continue
        pa, pb = blocks.unpack(t.data, t.type, t.cols), blocks.unpack(b[name].data, t.type, t.cols)
        assert np.array_equal(pa.q, pb.q), name
        assert not np.array_equal(pa.d, pb.d), name


def test_llama_cpp_runs_a_tuned_q4_k_m_as_torch_computes_it_with_lower_kld(tuned_k, tokenizer):
    from compress.evaluate.quality import kld
    from compress.models import load_model
    teacher, data, plain, art = tuned_k
    ids = heldout_ids(tokenizer, data, 256)
    got, want = llama_logprobs(art.file, ids), torch_logprobs(file_model(teacher, art.file), ids)
    # llama.cpp rounds activations to 8 bits before a K-quant product: the plain file's own gap
    # between torch and llama.cpp is the runtime's tolerance
    plain_lp = llama_logprobs(plain.file, ids)
    tolerance = kld(torch_logprobs(file_model(teacher, plain.file), ids), plain_lp)
    assert kld(want, got) < 2 * tolerance, (kld(want, got), tolerance)
    assert kld(want, got) < 0.2 * kld(plain_lp, got), (kld(want, got), kld(plain_lp, got))
    ref = torch_logprobs(load_model(str(teacher.path)), ids)
    before, after = kld(ref, plain_lp), kld(ref, got)
    assert after < 0.95 * before, (before, after)   # measured: 0.094 -> 0.084
