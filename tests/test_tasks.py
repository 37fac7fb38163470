"""Benchmark tasks: the lm-eval adapter by hand, against HFLM, across runtimes, in the stage and report.

Tiny random models (conftest.make_tiny) with the teacher's real tokenizer; real lm-eval, real
llama.cpp; task data from ../shared/data through the YAMLs compress ships (eval.task_data).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from compress import artifacts
from compress.config import load_config, resolved_threads
from compress.evaluate import quality
from compress.evaluate.lm_adapter import RuntimeLM, continuation_score
from compress.evaluate.runtimes import open_runtime

from conftest import SHARED, make_tiny, save_hf_artifact

needs_data = pytest.mark.skipif(not (SHARED / "arc_easy" / "arc_easy.jsonl").is_file(),
                                reason="needs ../shared/data (offline benchmark copies)")


def req(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def tiny_pair(tokenizer, tmp_path_factory):
    """(HF artifact, its GGUF F16 export) of a tiny random Llama, saved as a run's teacher."""
    from compress.export import gguf as gguf_export
    run = tmp_path_factory.mktemp("tasks") / "t"
    hf = save_hf_artifact(make_tiny(tokenizer, layers=2, hidden=64), tokenizer, run / "teacher", stage="teacher")
    cfg = load_config(["name=t", f"out={run.parent}", "export.gguf=F16"])
    return hf, gguf_export.run(cfg, hf, run / "gguf-F16")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_pair):
    """The same tiny Llama exported to fp32 ONNX (onnxruntime)."""
    from compress.export import onnx as onnx_export
    hf = tiny_pair[0]
    cfg = load_config(["name=t", f"out={hf.path.parent.parent}", "export.onnx=fp32"])
    return onnx_export.run(cfg, hf, hf.path.parent / "onnx-fp32")


def prefix_token(tok) -> int:
    """As HFLM: BOS when the tokenizer has one (SmolLM2: <|im_start|>), else EOS."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def lm_for(art, tokenizer, max_length=512):
    return RuntimeLM(lambda n: open_runtime(art, 1, vocab=len(tokenizer), n_ctx=n), tokenizer, max_length=max_length)


# ---------------------------------------------------------------- scoring by hand

def test_continuation_score_by_hand():
    lp = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3], [0.2, 0.2, 0.6]], dtype=np.float32))
    ids = [0, 1, 2, 2]                      # rows 0..2 predict ids 1..3; continuation = last two
    ll, greedy = continuation_score(lp, ids, 2)
    assert ll == pytest.approx(np.log(0.3) + np.log(0.6), rel=1e-6) and greedy is False
    ll, greedy = continuation_score(lp, [0, 1, 0, 2], 3)    # 0.6, 0.5, 0.6: all argmax
    assert ll == pytest.approx(np.log(0.6 * 0.5 * 0.6), rel=1e-6) and greedy is True


@pytest.mark.parametrize("which", ["hf", "gguf", "onnx"])
def test_loglikelihood_equals_runtime_logprobs_by_hand(tiny_pair, tokenizer, which, request):
    art = request.getfixturevalue("tiny_onnx") if which == "onnx" else tiny_pair[0 if which == "hf" else 1]
    lm = lm_for(art, tokenizer)
    pairs = [("Question: What do plants need?\nAnswer:", " sunlight"),
             ("Question: What do plants need?\nAnswer:", " water and soil"),   # shares the context: KV reuse
             ("The sky is ", "blue."),                                        # trailing space moves over
             ("", "Hello world")]                                             # empty context: prefix token
    got = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    rt = open_runtime(art, 1, vocab=len(tokenizer), n_ctx=64)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont
            whole = tokenizer(ctx + cont)["input_ids"]
            c_ids = whole[len(tokenizer(ctx)["input_ids"]):]
            ids = whole
        else:
            c_ids = tokenizer(cont)["input_ids"]
            ids = [prefix_token(tokenizer)] + c_ids       # the prefix token stands in for no context
        lp = rt.logprobs(ids[:-1])                       # one full pass, no cache
        want = sum(float(lp[t - 1, ids[t]]) for t in range(len(ids) - len(c_ids), len(ids)))
        assert ll == pytest.approx(want, abs=2e-3)
        assert greedy == all(int(lp[t - 1].argmax()) == ids[t] for t in range(len(ids) - len(c_ids), len(ids)))
    rt.close()
    lm.close()


def test_adapter_agrees_with_lm_evals_hflm(tiny_pair, tokenizer):
    from compress.models import load_model
    from lm_eval.models.huggingface import HFLM
    hf = tiny_pair[0]
    reqs = [req("loglikelihood", "Question: Which gas do plants take in?\nAnswer:", c)
            for c in (" carbon dioxide", " oxygen", " helium")] + [req("loglikelihood", "", "Plain text.")]
    ref = HFLM(pretrained=load_model(str(hf.path)), tokenizer=tokenizer, batch_size=4, max_length=512)
    want = ref.loglikelihood(reqs, disable_tqdm=True)
    lm = lm_for(hf, tokenizer)
    got = lm.loglikelihood(reqs)
    lm.close()
    for (a, ga), (b, gb) in zip(got, want):
        assert a == pytest.approx(b, abs=1e-3) and ga == gb


def test_rolling_and_greedy_generation_by_hand(tiny_pair, tokenizer):
    hf, f16 = tiny_pair
    text = "To be, or not to be, that is the question."
    ids = [prefix_token(tokenizer)] + tokenizer(text)["input_ids"]   # the prefix token, then the text
    rt = open_runtime(hf, 1, vocab=len(tokenizer))
    want = -quality.token_nll(rt.logprobs(ids), ids).sum()           # every text token, one pass
    lm = lm_for(hf, tokenizer)
    (one,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    lm.close()
    assert one == pytest.approx(want, abs=2e-3)
    lm = lm_for(hf, tokenizer, max_length=4)             # several disjoint windows of <= 4 tokens
    (windows,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert lm.forward_calls == -(-(len(ids) - 1) // 4) and np.isfinite(windows) and windows != pytest.approx(want)
    lm.close()
    outs = []
    for art in (hf, f16):
        lm = lm_for(art, tokenizer)
        outs.append(lm.generate_until([req("generate_until", "Once upon a time", {"until": ["\n\n"], "max_gen_toks": 6})]))
        lm.close()
    prompt = tokenizer("Once upon a time")["input_ids"]
    tok, new = rt.prefill(prompt), []
    for _ in range(6):
        new.append(tok)
        tok = rt.decode_step(tok)
    assert outs[0] == [tokenizer.decode(new).split("\n\n")[0]]
    assert isinstance(outs[1][0], str)                    # greedy text may differ on near-ties: not compared
    rt.close()


# ---------------------------------------------------------------- tasks in the stage

def _cfg(tmp_path, *extra):
    return load_config(["name=t", f"out={tmp_path}", "eval.seqs=2", "eval.seq_len=32", "eval.prefill_tokens=16",
                        "eval.decode_tokens=4", "eval.threads=1", "eval.memory=false", "eval.ood_seqs=2", *extra])


@needs_data
def test_gguf_f16_scores_within_one_stderr_of_hf_and_report_shows_tasks(tiny_pair, tiny_data, tmp_path):
    from compress.evaluate import run
    from compress.pipeline import write_run_meta
    from compress.report import build, write
    hf, f16 = tiny_pair
    run_dir = hf.path.parent
    cfg = _cfg(run_dir.parent, "eval.tasks=[arc_easy,copa]", "eval.limit=24", f"eval.task_data={SHARED}")
    evs = {a.name: run(cfg, a, run_dir / f"eval-{a.name}", teacher=hf, data=tiny_data) for a in (hf, f16)}
    t_hf = evs["teacher"].meta["metrics"]["quality"]["tasks"]
    t_gg = evs["gguf-F16"].meta["metrics"]["quality"]["tasks"]
    for task, chance in (("arc_easy", 0.25), ("copa", 0.5)):
        a, b = t_hf[task], t_gg[task]
        assert a["metric"] == "acc" and a["n"] == 24 and a["chance"] == pytest.approx(chance)
        assert 0 <= a["value"] <= 1 and a["stderr"] > 0 and set(a["metrics"]) >= {"acc"}
        assert abs(a["value"] - b["value"]) <= a["stderr"], (task, a["value"], b["value"])
    ood = evs["gguf-F16"].meta["metrics"]["quality"]["ood"]
    assert ood["source"] == "builtin" and ood["kld"] < 0.05 and ood["ppl"] > 1 and ood["tokens"] == 64
    assert (run_dir / "reference-ood" / "logprobs.npy").is_file()
    write_run_meta(cfg)
    report = build(run_dir)
    assert set(report["tasks"]) == {"arc_easy", "copa"} and report["tasks"]["copa"]["n"] == 24
    arts = {a["name"]: a for a in report["artifacts"]}
    assert arts["gguf-F16"]["quality"]["tasks"]["arc_easy"]["value"] == t_gg["arc_easy"]["value"]
    assert arts["gguf-F16"]["quality"]["ood"]["kld"] == ood["kld"]
    rows = {r["name"]: r for r in report["compression"]}
    assert rows["teacher"]["size_reduction"] == 1.0 and rows["gguf-F16"]["size_reduction"] > 1.5
    assert rows["gguf-F16"]["recipe"] == "teacher + GGUF F16"
    md = write(run_dir)["md"].read_text()
    assert "## Benchmark tasks" in md and "## Robustness" in md and "## Compression vs the teacher" in md
    # Same config again: the evaluation is reused (tasks are part of the stage's config).
    from compress.evaluate.stage import run as evaluate
    ident = evaluate.stage.identity(cfg, f16, teacher=hf, data=tiny_data, threads=resolved_threads(cfg))
    assert artifacts.find_done(run_dir / "eval-gguf-F16", ident.hash)


@needs_data
def test_onnx_fp32_scores_within_one_stderr_of_hf(tiny_pair, tiny_onnx, tiny_data):
    """The ONNX artifact runs the benchmark in onnxruntime through the same adapter."""
    from compress.evaluate import run
    hf = tiny_pair[0]
    run_dir = hf.path.parent
    cfg = _cfg(run_dir.parent, "eval.tasks=[arc_easy]", "eval.limit=24", f"eval.task_data={SHARED}",
               "eval.ood=none")
    evs = {a.name: run(cfg, a, run_dir / f"eval-{a.name}-onnxcheck", teacher=hf, data=tiny_data)
           for a in (hf, tiny_onnx)}
    a = evs["teacher"].meta["metrics"]["quality"]["tasks"]["arc_easy"]
    b = evs["onnx-fp32"].meta["metrics"]["quality"]["tasks"]["arc_easy"]
    assert evs["onnx-fp32"].meta["metrics"]["runtime"] == "onnxruntime" and b["n"] == 24
    assert abs(a["value"] - b["value"]) <= a["stderr"], (a["value"], b["value"])


def test_unreachable_task_data_is_recorded_not_fatal(tiny_pair, tokenizer, tmp_path):
    from compress.evaluate import tasks
    (tmp_path / "mine.yaml").write_text(
        "task: my_missing\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'absent.jsonl'}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\nmetric_list:\n  - metric: acc\n")
    cfg = _cfg(tmp_path, "eval.tasks=[my_missing]", f"eval.include_path={tmp_path}")
    hf = tiny_pair[0]
    with pytest.warns(UserWarning, match="my_missing skipped"):
        out = tasks.run(cfg, lambda n: open_runtime(hf, 1, vocab=len(tokenizer), n_ctx=n), tokenizer, 512)
    assert out["my_missing"]["unavailable"].startswith("unavailable: ")


def test_hub_task_offline_is_recorded_at_once_not_retried(tiny_pair, tokenizer, tmp_path, monkeypatch):
    """lm-eval's own arc_easy needs the hub; when the hub refuses connections the lookup runs in
    offline mode (one OfflineModeIsEnabled, no retry loop) and the task is recorded unavailable."""
    from compress.evaluate import tasks
    monkeypatch.setattr(tasks, "hub_address", lambda: ("127.0.0.1", 9))   # nothing listens: refused
    monkeypatch.setattr(tasks, "_loaded", {})
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert not tasks.hub_reachable()
    cfg = _cfg(tmp_path, "eval.tasks=[arc_easy]", "eval.limit=4")
    hf = tiny_pair[0]
    with pytest.warns(UserWarning, match="arc_easy skipped"):
        out = tasks.run(cfg, lambda n: open_runtime(hf, 1, vocab=len(tokenizer), n_ctx=n), tokenizer, 512)
    assert "OfflineModeIsEnabled" in out["arc_easy"]["unavailable"], out
    import datasets.config
    from huggingface_hub import constants
    assert not constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE   # restored afterwards


def test_retention_is_measured_above_chance():
    from compress.report.quality import retention
    assert retention(0.25, 0.5, 0.25) == 0.0              # a guesser keeps nothing
    assert retention(0.5, 0.5, 0.25) == 1.0
    assert retention(0.375, 0.5, 0.25) == 0.5
    assert retention(0.4, 0.24, 0.25) is None              # teacher at chance: nothing to retain


def test_shipped_task_yamls_render_only_where_files_exist(tmp_path):
    from compress.evaluate.tasks import SHIPPED, rendered_shipped
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa" / "copa.jsonl").write_text(json.dumps({"query": "It rained, therefore", "choices": ["a", "b"],
                                                              "gold": 0}) + "\n")
    out = rendered_shipped(str(tmp_path))
    assert [p.name for p in out.glob("*.yaml")] == ["copa.yaml"]
    assert str(tmp_path.resolve()) in (out / "copa.yaml").read_text()
    assert {p.stem for p in SHIPPED.glob("*.yaml")} == {"arc_easy", "boolq", "copa", "openbookqa", "lambada_openai"}
