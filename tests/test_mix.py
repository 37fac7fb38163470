"""The auto GGUF mix: the knapsack solver on made-up sensitivities, and a real mix of a tiny model
built by llama.cpp, checked against its choice, its budget and a uniform type of the same size."""
import itertools
import random

import gguf
import numpy as np
import pytest

from compress.config import load_config
from compress.errors import UserError
from compress.quantize import mix
from conftest import make_tiny, save_hf_artifact


# ---------------------------------------------------------------- solver

def brute_force(options, budget):
    best = None
    for picks in itertools.product(*[range(len(o)) for o in options]):
        size = sum(options[i][k][0] for i, k in enumerate(picks))
        err = sum(options[i][k][1] for i, k in enumerate(picks))
        if size <= budget and (best is None or err < best[0]):
            best = (err, picks)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_solver_finds_the_optimum_of_small_cases(seed):
    rng = random.Random(seed)
    options = [[(rng.randint(1, 40), rng.random()) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 6))]
    smallest = sum(min(b for b, _ in o) for o in options)
    budget = smallest + rng.randint(0, 60)
    picks = mix.solve(options, budget)
    assert sum(options[i][k][0] for i, k in enumerate(picks)) <= budget
    err = sum(options[i][k][1] for i, k in enumerate(picks))
    assert err == pytest.approx(brute_force(options, budget)[0])


def test_solver_trades_bytes_where_they_buy_the_most():
    # two tensors, same sizes; the first is 10x as sensitive, so it gets the big type
    options = [[(100, 1.0), (50, 10.0)], [(100, 0.1), (50, 1.0)]]
    assert mix.solve(options, 150) == [0, 1]
    assert mix.solve(options, 200) == [0, 0]
    assert mix.solve(options, 100) == [1, 1]


def test_solver_fits_the_budget_when_sizes_are_rounded():
    rng = random.Random(0)
    options = [[(rng.randint(10**6, 10**7), rng.random()) for _ in range(5)] for _ in range(50)]
    budget = sum(sorted(b for b, _ in o)[2] for o in options)
    picks = mix.solve(options, budget, units=1000)   # coarse steps: sizes round up, the answer still fits
    assert sum(options[i][k][0] for i, k in enumerate(picks)) <= budget


def test_solver_refuses_a_budget_below_the_smallest_choice():
    with pytest.raises(mix.Infeasible, match="smallest choice takes 30 bytes"):
        mix.solve([[(10, 1.0), (20, 0.5)], [(20, 1.0)]], 29)


def test_refine_sees_errors_of_different_tensors_that_add_up():
    # alone, each tensor's "grid" type looks cheapest; together its errors push every token the same way
    same = np.ones(64)
    alternating = np.tile([1.1, -1.1], 32)
    opts = [[mix.Option("F16", 100, np.zeros(64)), mix.Option("Q4_1", 50, same),
             mix.Option("Q4_0", 50, alternating * sign)] for sign in (1, -1)]
    picks = mix.solve([[(o.bytes, o.err) for o in os_] for os_ in opts], 100)
    assert [opts[i][k].type for i, k in enumerate(picks)] == ["Q4_1", "Q4_1"]
    assert mix.objective([opts[i][k] for i, k in enumerate(picks)]) == pytest.approx(4.0)
    better = mix.refine(opts, picks, 100)
    assert sum(opts[i][k].bytes for i, k in enumerate(better)) <= 100
    assert mix.objective([opts[i][k] for i, k in enumerate(better)]) < 2.5


def test_widths_allow_only_the_types_llama_cpp_can_store():
    assert mix.allowed_types(576) == ["F16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]   # SmolLM2's width
    assert mix.allowed_types(1536) == list(mix.CANDIDATES)
    assert mix.allowed_types(100) == ["F16"]
    assert mix.type_bytes("Q4_0", 2, 64) == 2 * 2 * 18
    assert mix.type_bytes("Q4_K", 3, 512) == 3 * 2 * 144


def test_a_vocabulary_is_scored_on_the_rows_that_carry_its_gradients_and_lookups():
    rng = np.random.default_rng(0)
    vocab = 20000
    d = rng.normal(size=(16, vocab)) * 1e-6
    d[:, 123] = 5.0                                  # the rows the sampled gradients sit on
    freq = np.zeros(vocab)
    freq[[7, 9]] = [0.75, 0.25]                      # the tokens calibration looked up
    idx, weight = mix.score_rows(vocab, (None, d), (freq, None), top=10, spread=100)
    assert {7, 9, 123} <= set(idx) and len(idx) <= 2 + 10 + 100
    assert weight.sum() == pytest.approx(1.0)        # lookups: 90 % as seen, 10 % spread over the vocabulary
    assert weight[list(idx).index(7)] >= 0.9 * 0.75
    idx, weight = mix.score_rows(100, None, (np.full(100, 0.01), None))
    assert (idx == np.arange(100)).all() and weight.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- config

@pytest.mark.parametrize("args, needle", [
    (["quantize.gguf=[auto]"], "budgets.max_size_mb"),
    (["quantize.gguf=[auto:0MB]"], "above 0 MB"),
    (["quantize.gguf=[auto:150%]"], "percentage"),
    (["quantize.gguf=[auto:80GB]"], "auto:80MB"),
    (["quantize.gguf=[Q4_0,Q4_0]"], "twice"),
])
def test_bad_size_targets_are_one_line(args, needle):
    with pytest.raises(UserError, match=needle):
        load_config(args)


def test_size_targets_parse_and_name_their_artifacts():
    assert load_config(["budgets.max_size_mb=80", "quantize.gguf=[auto,auto:50MB,auto:30%]"]).quantize.gguf
    from compress.formats import size_target
    assert size_target("auto:80MB") == (80, "MB") and size_target("auto") == (None, None)
    assert [mix.artifact_name(q) for q in ("auto", "auto:80MB", "auto:30%")] == \
        ["gguf-auto", "gguf-auto-80MB", "gguf-auto-30pct"]


# ---------------------------------------------------------------- a real mix

@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """A tiny Llama whose widths take k-quants, its F16 GGUF, importance matrix and sensitivity."""
    from compress.export import gguf as export_gguf
    from compress.quantize import imatrix, sensitivity
    from conftest import SHARED, save_data_artifact
    work = tmp_path_factory.mktemp("mix")
    text = (SHARED / "tiny_shakespeare" / "input.txt")
    paras = [p for p in text.read_text().split("\n\n") if len(p) > 200][:80] if text.exists() else \
        [("The quick brown fox jumps over the lazy dog. " * 12 + f"Sample {i}.") for i in range(80)]
    data = save_data_artifact(paras[:70], paras[70:], work / "data")
    model = make_tiny(tokenizer, hidden=256, intermediate=512, heads=4, kv_heads=2, layers=2)
    with __import__("torch").no_grad():   # smaller weights: a model whose quantization error is moderate
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(0.25)
    hf = save_hf_artifact(model, tokenizer, work / "student")
    cfg = load_config([f"out={work}", "name=r", "quantize.imatrix_tokens=512", "quantize.mix_tokens=512",
                       "budgets.max_size_mb=20"])
    f16 = export_gguf.run(cfg, hf, work / "gguf-F16")
    im = imatrix.run(cfg, hf, work / "imatrix", data=data)
    sens = sensitivity.run(cfg, hf, work / "sensitivity", data=data)
    return cfg, work, f16, im, sens


def test_sensitivity_covers_every_matrix_in_gguf_names(built, tokenizer):
    from compress.quantize import sensitivity
    from compress.quantize.sensitivity import lookup_factors, samples_of
    cfg, work, f16, im, sens = built
    stats = np.load(sens.file)
    for t in gguf.GGUFReader(str(f16.file)).tensors:
        if len(t.shape) != 2:
            continue
        x, d = samples_of(stats, t.name)
        assert x.shape == (sensitivity.SAMPLES, int(t.shape[0])) and d.shape == (sensitivity.SAMPLES, int(t.shape[1]))
        assert np.abs(x).sum() > 0 and np.abs(d).sum() > 0 and np.isfinite(d).all()
    rows, cols = lookup_factors(stats, "token_embd.weight")   # tied: looked up as well as multiplied
    assert rows.shape == (len(tokenizer),) and rows.min() >= 0 and abs(rows.sum() - 1) < 1e-3
    assert len(stats["check_ids"]) > 0


def test_mix_is_built_as_chosen_within_budget_and_beats_the_uniform_type_of_its_size(built):
    from compress.evaluate.quality import kld
    from compress.evaluate.runtimes import LlamaCppRuntime
    from compress.quantize import gguf as quantize_gguf
    cfg, work, f16, im, sens = built
    q4 = quantize_gguf.run(cfg, f16, work / "gguf-Q4_0", qtype="Q4_0", imatrix=im)
    budget = q4.file.stat().st_size / 1e6
    art = mix.run(cfg, f16, work / "gguf-auto-q4", qtype=f"auto:{budget}MB", imatrix=im, sensitivity=sens)
    m = art.meta["metrics"]
    assert art.meta["quant"] == f"auto:{budget:g}MB"
    built_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(art.file)).tensors if len(t.shape) == 2}
    assert built_types == m["tensors"]
    assert art.file.stat().st_size <= budget * 1e6
    assert set(built_types.values()) <= set(mix.CANDIDATES) and len(set(built_types.values())) > 1
    assert m["predicted_kld"] > 0 and m["measured_kld"] > 0
    # held-out tokens, llama.cpp: the mix loses less than uniform Q4_0 at the same size
    ids = [int(i) for i in np.load(sens.file)["check_ids"]][:256]
    lps = {}
    for name, path in (("f16", f16.file), ("q4", q4.file), ("mix", art.file)):
        rt = LlamaCppRuntime(str(path), 1, n_ctx=len(ids))
        lps[name] = rt.logprobs(ids)
        rt.close()
    assert kld(lps["f16"], lps["mix"]) < kld(lps["f16"], lps["q4"])


def test_a_larger_budget_predicts_less_loss_and_the_prediction_tracks_llama_cpp(built):
    cfg, work, f16, im, sens = built
    small = mix.run(cfg, f16, work / "gguf-auto-small", qtype="auto:30%", imatrix=im, sensitivity=sens).meta["metrics"]
    large = mix.run(cfg, f16, work / "gguf-auto-large", qtype="auto:60%", imatrix=im, sensitivity=sens).meta["metrics"]
    assert large["size_mb"] > small["size_mb"]
    assert large["predicted_kld"] < small["predicted_kld"]
    assert large["measured_kld"] < small["measured_kld"]
    # the Fisher form predicts what llama.cpp then measures (different tokens, activations rounded too)
    assert 0.2 < small["predicted_kld"] / small["measured_kld"] < 5, small


def test_an_impossible_budget_names_the_smallest_size(built):
    cfg, work, f16, im, sens = built
    with pytest.raises(UserError, match=r"below the smallest mix of this model, \d+\.\d MB"):
        mix.run(cfg, f16, work / "gguf-auto-1", qtype="auto:1MB", imatrix=im, sensitivity=sens)
    assert not (work / "gguf-auto-1").exists()


def test_scored_candidates_are_the_bytes_llama_cpp_writes(built):
    from gguf.quants import dequantize
    from compress.quantize import gguf as quantize_gguf
    from compress.quantize.header import tensors_of
    cfg, work, f16, im, sens = built
    matrix = dict(np.load(im.file))
    ref = tensors_of(f16.file)
    for qtype, stored in (("Q4_K_M", ("Q4_K", "Q6_K")), ("Q4_0", ("Q4_0",))):
        art = quantize_gguf.run(cfg, f16, work / f"gguf-{qtype}-bytes", qtype=qtype, imatrix=im)
        checked = 0
        for name, t in tensors_of(art.file).items():
            if t.type in stored:
                w = dequantize(ref[name].data, mix.gguf_type(ref[name].type))
                assert np.array_equal(mix.ggml_quantize(w, t.type, matrix.get(name)), t.data), (qtype, name)
                checked += 1
        assert checked >= 3


def test_a_misled_mix_loses_to_llama_cpps_own_type_which_then_ships(built, tmp_path):
    """Statistics that say only the embedding table matters make the mix give every layer the fewest
    bits; the measured check ships llama.cpp's own type of the largest size that fits."""
    from compress import artifacts
    cfg, work, f16, im, sens = built
    stats = dict(np.load(sens.file))
    blind = {k: (np.zeros_like(v) if k.startswith("d/blk.") else v) for k, v in stats.items()}
    with artifacts.writing(tmp_path / "blind", stage="sensitivity", config={}, parents=[], format="sensitivity",
                           file="sensitivity.npz") as (tmp, meta):
        np.savez(tmp / "sensitivity.npz", **blind)
    art = mix.run(cfg, f16, work / "gguf-auto-blind", qtype="auto:45%", imatrix=im,
                  sensitivity=artifacts.load(tmp_path / "blind"))
    m = art.meta["metrics"]
    assert m["uniform"]["type"] in mix.UNIFORM, m
    assert m["shipped"] == m["uniform"]["type"] and m["uniform"]["measured_kld"] < m["measured_kld"], {k: m[k] for k in ("tensor_types", "uniform", "measured_kld", "predicted_kld")}
    assert art.file.stat().st_size <= m["budget_mb"] * 1e6
    assert m["tensors"] == {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(art.file)).tensors
                            if len(t.shape) == 2}


def test_a_quant_writes_its_modelfile_when_the_f16_has_none(built, tmp_path):
    import shutil
    from types import SimpleNamespace
    from compress.quantize import gguf as quantize_gguf
    cfg, work, f16, im, sens = built
    (tmp_path / "f16").mkdir()
    (tmp_path / "q").mkdir()
    shutil.copyfile(f16.file, tmp_path / "q" / "model.gguf")
    quantize_gguf.modelfile(SimpleNamespace(path=tmp_path / "f16"), tmp_path / "q")
    assert "FROM" in (tmp_path / "q" / "Modelfile").read_text()
