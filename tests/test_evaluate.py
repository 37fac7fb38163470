"""Evaluate stage: quality maths by hand, runtimes against each other, the stage end to end."""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress import artifacts
from compress.config import load_config
from compress.errors import UserError
from compress.evaluate import quality
from compress.evaluate.reference import heldout_ids

from conftest import make_tiny, save_data_artifact, save_hf_artifact


def _lp(probs) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# ---------------------------------------------------------------- quality maths

def test_perplexity_by_hand():
    lp = _lp([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    ids = [0, 1, 2]   # row 0 predicts ids[1]=1 (p 0.5), row 1 predicts ids[2]=2 (p 0.8)
    assert quality.perplexity(lp, ids) == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.8)) / 2), rel=1e-5)
    uniform = np.full((5, 4), np.log(0.25), dtype=np.float32)
    assert quality.perplexity(uniform, [0, 1, 2, 3, 0]) == pytest.approx(4.0, rel=1e-5)


def test_kld_known_two_token_case_and_zero_on_itself():
    p, q = _lp([[0.5, 0.5]]), _lp([[0.9, 0.1]])
    want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)   # 0.5108 nats
    assert quality.kld(p, q) == pytest.approx(want, rel=1e-5)
    back = 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5)    # KL is not symmetric
    assert quality.kld(q, p) == pytest.approx(back, rel=1e-5)
    rng = np.random.default_rng(0)
    lp = quality.log_softmax(rng.normal(size=(7, 50)).astype(np.float32))
    assert quality.kld(lp, lp) == pytest.approx(0.0, abs=1e-7)
    # A float16 reference (as stored on disk) still scores ~0 against its float32 source.
    assert quality.kld(lp.astype(np.float16), lp) < 1e-5


def test_top1_agreement_by_hand():
    ref = _lp([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    lp = _lp([[0.5, 0.4, 0.1], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.5, 0.2, 0.3]])
    assert quality.top1_match(ref, lp).tolist() == [True, False, True, False]
    assert quality.top1(ref, lp) == 0.5
    assert quality.top1(ref, ref) == 1.0


def test_chunked_kl_matches_direct_formula():
    rng = np.random.default_rng(1)
    t = 3 * quality.CHUNK + 5     # crosses several chunk boundaries
    ref = quality.log_softmax(rng.normal(size=(t, 40)).astype(np.float32))
    lp = quality.log_softmax(rng.normal(size=(t, 40)).astype(np.float32))
    direct = (np.exp(ref) * (ref - lp)).sum(-1)
    np.testing.assert_allclose(quality.kl_per_token(ref, lp), direct, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError):
        quality.kld(ref, lp[:, :39])


def test_score_pools_tokens_over_sequences():
    rng = np.random.default_rng(2)
    ref = quality.log_softmax(rng.normal(size=(2, 6, 9)).astype(np.float32))
    ids = rng.integers(0, 9, size=(2, 6))
    art = quality.log_softmax(rng.normal(size=(2, 6, 9)).astype(np.float32))
    got = quality.score(ref, lambda seq: art[[list(r) for r in ids].index(seq)], ids)
    nll = np.concatenate([quality.token_nll(art[i], ids[i]) for i in range(2)])
    assert got["ppl"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-6)
    assert got["kld"] == pytest.approx(quality.kld(ref.reshape(12, 9), art.reshape(12, 9)), rel=1e-6)


# ---------------------------------------------------------------- held-out ids

def test_heldout_ids_join_with_eos_and_cut(tokenizer):
    texts = ["one two three four five six seven", "eight nine ten", "eleven twelve"]
    ids = heldout_ids(tokenizer, texts, seqs=3, seq_len=4)
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.shape == (min(3, len(stream) // 4), 4)
    assert ids.reshape(-1).tolist() == stream[:ids.size]
    short = heldout_ids(tokenizer, ["a short text"], seqs=4, seq_len=64)   # shorter than one sequence
    assert short.shape[0] == 1 and 2 <= short.shape[1] < 64
    with pytest.raises(UserError, match="held-out data is empty"):
        heldout_ids(tokenizer, [], seqs=2, seq_len=32)


# ---------------------------------------------------------------- runtimes

def test_torch_runtime_cache_matches_full_forward(tiny_llama):
    from compress.evaluate.runtimes import open_runtime
    rt = open_runtime(tiny_llama, threads=1, vocab=49152)
    ids = list(range(100, 120))
    lp = rt.logprobs(ids)
    assert lp.shape == (20, 49152) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, rtol=1e-4)
    tok = rt.prefill(ids)
    assert tok == int(lp[-1].argmax())
    nxt = rt.decode_step(tok)   # through the KV cache vs a fresh forward over ids + [tok]
    assert nxt == int(rt.logprobs(ids + [tok])[-1].argmax())
    rt.close()


def test_torch_scoring_uses_no_deprecated_transformers_api(tiny_llama):
    """Evaluation hides library warnings (quiet_transformers, tasks.quiet), so a transformers
    deprecation announced for a KV-cache argument we pass would only show as a break after the
    next pin bump. Scoring, decoding and the prefix cache's crop run here with warnings shown."""
    import logging
    import warnings
    from transformers.utils import logging as hf_logging
    from compress.evaluate.lm_adapter import PrefixCache
    from compress.evaluate.runtimes import open_runtime
    rt = open_runtime(tiny_llama, threads=1, vocab=49152)
    ids = list(range(100, 120))
    logged = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = logged.append
    hf_logger, level = hf_logging.get_logger(), hf_logging.get_verbosity()
    hf_logger.addHandler(handler)
    hf_logging.set_verbosity_warning()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rt.logprobs(ids)
            rt.decode_step(rt.prefill(ids))
            cache = PrefixCache()
            cache.rows(rt, ids, 1)
            cache.rows(rt, ids[:10] + [7, 8], 1)   # shares 10 tokens: crops the DynamicCache
    finally:
        hf_logger.removeHandler(handler)
        hf_logging.set_verbosity(level)
        rt.close()
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    deprecations += [r.getMessage() for r in logged if "deprecat" in r.getMessage().lower()]
    assert not deprecations, deprecations


def test_unknown_format_is_a_user_error(tmp_path):
    from compress.evaluate.runtimes import open_runtime
    with artifacts.writing(tmp_path / "x", stage="data", config={}, parents=[], format="data"):
        pass
    with pytest.raises(UserError, match="no runtime"):
        open_runtime(artifacts.load(tmp_path / "x"), threads=1)


def test_load_warning_only_when_threads_lack_free_cores():
    from compress.evaluate.speed import load_warning
    assert load_warning(2, busy=0.1, cores=2) is None
    assert "2 threads" in load_warning(2, busy=1.0, cores=2)
    assert load_warning(1, busy=1.0, cores=2) is None      # one free core is enough for one thread


@pytest.fixture()
def tiny_gguf(tiny_llama, tmp_path):
    """The tiny Llama exported to an F32 GGUF by the export stage (lossless, so runtimes must agree)."""
    from compress.export import gguf as gguf_export
    cfg = load_config(["name=t", f"out={tmp_path}", "export.gguf=F32"])
    return gguf_export.run(cfg, tiny_llama, tmp_path / "gguf-F32")


def test_torch_and_llama_cpp_agree_on_the_same_ids(tiny_llama, tiny_gguf, tokenizer):
    from compress.evaluate.runtimes import open_runtime
    ids = tokenizer("To be, or not to be, that is the question: whether 'tis nobler in the mind",
                    add_special_tokens=False)["input_ids"]
    torch_rt = open_runtime(tiny_llama, threads=1, vocab=len(tokenizer))
    cpp_rt = open_runtime(tiny_gguf, threads=1, vocab=len(tokenizer), n_ctx=64)
    assert cpp_rt.name == "llama.cpp" and torch_rt.name == "torch"
    a, b = torch_rt.logprobs(ids), cpp_rt.logprobs(ids)
    assert a.shape == b.shape == (len(ids), len(tokenizer))
    assert quality.kld(a, b) < 1e-3
    assert quality.top1(a, b) >= 0.95
    assert cpp_rt.prefill(ids) == int(b[-1].argmax())
    torch_rt.close()
    cpp_rt.close()
    # A different model must not pass the same check: the comparison can fail.
    other = save_hf_artifact(make_tiny(tokenizer, seed=1), tokenizer, tiny_llama.path.parent / "other")
    c = open_runtime(other, threads=1, vocab=len(tokenizer)).logprobs(ids)
    assert quality.kld(a, c) > 0.1


def test_memory_child_for_gguf_is_light(tiny_gguf):
    from compress.evaluate.memory import peak_rss_mb
    child = peak_rss_mb(tiny_gguf, threads=1, prefill=16, decode=4)
    parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # holds torch + transformers
    assert 0 < child < parent
    # The child's import path holds llama_cpp only: torch would add hundreds of MB to the figure.
    code = ("import sys; from compress.evaluate.memory import measure_here; "
            f"measure_here({str(tiny_gguf.path)!r}, 1, 8, 2); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------- the stage

def _cfg(tmp_path, *extra):
    return load_config(["name=t", f"out={tmp_path}", "eval.seqs=2", "eval.seq_len=32",
                        "eval.prefill_tokens=16", "eval.decode_tokens=4", "eval.threads=1",
                        "eval.memory=false", *extra])


def test_run_writes_all_metrics_and_reuses_reference(tiny_llama, tiny_data, tokenizer, tmp_path):
    from compress.evaluate import run
    cfg = _cfg(tmp_path)
    run_dir = tmp_path / "t"
    teacher = tiny_llama
    ev = run(cfg, teacher, run_dir / "eval-teacher", teacher=teacher, data=tiny_data)
    m = ev.meta["metrics"]
    assert set(m) == {"artifact", "format", "runtime", "device", "quality", "speed", "memory", "eval_tokens", "host"}
    assert m["device"] == "cpu"
    assert set(m["quality"]) == {"ppl", "kld", "top1", "ood", "tasks"}
    assert set(m["speed"]) == {"threads", "prefill_tps", "decode_tps", "ttft_ms", "load_warning"}
    assert m["format"] == "hf" and m["runtime"] == "torch" and m["artifact"] == teacher.name
    assert m["quality"]["kld"] < 1e-4 and m["quality"]["top1"] == 1.0     # the teacher vs itself
    assert m["quality"]["ppl"] > 1 and m["eval_tokens"] == 64
    assert m["speed"]["threads"] == 1 and m["speed"]["prefill_tps"] > 0 and m["speed"]["decode_tps"] > 0
    assert m["memory"] == {"peak_rss_mb": None}
    assert m["host"]["cores"] >= 1 and m["host"]["cpu"]
    assert ev.meta["stage"] == "evaluate" and ev.meta["format"] == "eval"
    assert [p["name"] for p in ev.meta["parents"]] == [teacher.name, teacher.name, tiny_data.name]
    assert json.loads((run_dir / "eval-teacher" / "meta.json").read_text())["metrics"] == m

    ref = artifacts.load(run_dir / "reference")
    lp = np.load(ref.path / "logprobs.npy", mmap_mode="r")
    assert lp.dtype == np.float16 and lp.shape == (2, 32, len(tokenizer))
    stamp = (ref.meta["created"], (ref.path / "logprobs.npy").stat().st_mtime_ns)

    student = save_hf_artifact(make_tiny(tokenizer, seed=3), tokenizer, tmp_path / "student")
    ev2 = run(cfg, student, run_dir / "eval-student", teacher=teacher, data=tiny_data)
    again = artifacts.load(run_dir / "reference")
    assert (again.meta["created"], (again.path / "logprobs.npy").stat().st_mtime_ns) == stamp
    q = ev2.meta["metrics"]["quality"]
    assert q["kld"] > 0.1 and q["top1"] < 1.0


def test_run_on_gguf_uses_llama_cpp_and_measures_memory(tiny_llama, tiny_gguf, tiny_data, tmp_path):
    from compress.evaluate import run
    cfg = _cfg(tmp_path, "eval.memory=true")
    ev = run(cfg, tiny_gguf, tmp_path / "t" / "eval-gguf", teacher=tiny_llama, data=tiny_data)
    m = ev.meta["metrics"]
    assert m["runtime"] == "llama.cpp" and m["format"] == "gguf"
    assert m["quality"]["kld"] < 1e-3 and m["quality"]["top1"] >= 0.95
    assert m["memory"]["peak_rss_mb"] > 0


def test_empty_heldout_is_a_user_error(tiny_llama, tmp_path):
    from compress.evaluate import run
    data = save_data_artifact(["some training text"], [], tmp_path / "data-empty")
    with pytest.raises(UserError, match="held-out data is empty"):
        run(_cfg(tmp_path), tiny_llama, tmp_path / "t" / "eval-x", teacher=tiny_llama, data=data)
    assert not (tmp_path / "t" / "eval-x").exists()
