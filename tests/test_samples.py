"""Sample answers in the report and `compress chat`, on a whole tiny run with GGUF and ONNX artifacts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compress import artifacts
from compress.cli import main
from compress.evaluate.generate import TextStream, chat_ids, greedy, stop_ids
from compress.evaluate.runtimes import open_runtime
from conftest import make_tiny

ROOT = Path(__file__).resolve().parents[1]
# A prompt that must come out escaped in HTML and markdown
TRICKY = "Is <b>bold</b> & [x](y) | ok?"


@pytest.fixture(scope="module")
def run(tokenizer, tmp_path_factory):
    """A whole run of a tiny teacher with chat data: HF, GGUF F16 and ONNX fp32 artifacts."""
    tmp = tmp_path_factory.mktemp("samples")
    teacher = tmp / "teacher-src"
    model = make_tiny(tokenizer)
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    rows = [{"prompt": TRICKY if i == 0 else f"Question number {i}: what is {i} plus {i}?",
             "response": f"The answer is {2 * i}. " * 3} for i in range(40)]
    data = tmp / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["run", f"teacher={teacher}", f"data={data}", "name=r", f"out={tmp}", "gen.heldout=0.3",
            "student.layers=1", "distill.tokens=256", "distill.seq_len=32", "distill.batch=2",
            "quantize.gguf=[]", "quantize.teacher=false", "export.onnx=fp32", "eval.seqs=2", "eval.seq_len=32",
            "eval.prefill_tokens=16", "eval.decode_tokens=4", "eval.threads=1", "eval.memory=false",
            "eval.ood=none", "samples.prompts=3", "samples.tokens=12", "preflight=false"]
    proc = subprocess.run([sys.executable, "-m", "compress", *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "r", args


def test_every_artifact_answers_the_held_out_prompts_in_its_runtime(run, tokenizer):
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    s = report["samples"]
    held = [json.loads(l) for l in (run_dir / "data" / "heldout.jsonl").read_text().splitlines()]
    assert s["source"] == "held-out" and s["teacher"] == "teacher" and s["max_tokens"] == 12
    assert [p["prompt"] for p in s["prompts"]] == [r["prompt"] for r in held][:3]
    train = (run_dir / "data" / "train.jsonl").read_text()
    for p in s["prompts"]:
        assert p["prompt"][-1]["content"] not in train            # never trained on
        by = {a["artifact"]: a for a in p["answers"]}
        assert set(by) == {"teacher", "student", "distilled", "gguf-F16", "onnx-fp32"}
        assert by["teacher"]["same_tokens"] is None
        for a in by.values():
            assert 0 < a["tokens"] <= 12 or a["finished"]
    runtimes = {json.loads((run_dir / f"samples-{n}" / "meta.json").read_text())["metrics"]["runtime"]
                for n in ("teacher", "gguf-F16", "onnx-fp32")}
    assert runtimes == {"torch", "llama.cpp", "onnxruntime"}


def test_an_answer_is_the_runtime_greedy_continuation(run, tokenizer):
    """The stored answer re-derived independently: each token is the argmax of the runtime's full
    log-probs over prompt + answer so far (no KV cache, another code path)."""
    run_dir, _ = run
    m = json.loads((run_dir / "samples-gguf-F16" / "meta.json").read_text())["metrics"]
    a = m["answers"][0]
    prompt = chat_ids(tokenizer, a["prompt"])
    rt = open_runtime(artifacts.load(run_dir / "gguf-F16"), 1, vocab=len(tokenizer), n_ctx=256)
    try:
        lp = rt.logprobs(prompt + a["ids"])
    finally:
        rt.close()
    assert [int(lp[len(prompt) - 1 + i].argmax()) for i in range(len(a["ids"]))] == a["ids"]
    assert a["text"] == tokenizer.decode(a["ids"], skip_special_tokens=True)


def test_departure_point_and_escaping_in_markdown_and_html(run):
    run_dir, _ = run
    report = json.loads((run_dir / "report.json").read_text())
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    assert "## Sample answers" in md and "<h2>Sample answers</h2>" in page
    for p in report["samples"]["prompts"]:
        for a in p["answers"]:
            if a["same_tokens"] is not None and not a["identical"]:
                assert a["same_chars"] <= len(a["text"])
    # the split is by content hash: this prompt lands in the held-out 30 %, first in file order
    assert report["samples"]["prompts"][0]["prompt"][-1]["content"] == TRICKY
    assert "<b>bold</b>" not in page          # a model or user text is never markup
    assert "&lt;b&gt;bold&lt;/b&gt; &amp;" in page
    assert "\\<b\\>bold\\</b\\> & \\[x\\](y) \\| ok?" in md


def test_departure_is_marked_where_the_tokens_first_differ():
    from compress.report.samples import answer_entry, samples_html, samples_markdown
    from compress.report.render import md_cell
    ref = {"ids": [1, 2, 3, 4], "text": "a b c d", "offsets": [1, 3, 5, 7], "finished": True}
    other = {"ids": [1, 2, 9], "text": "a b <x>", "offsets": [1, 3, 7], "finished": False}
    e = answer_entry("gguf-Q4_0", {"runtime": "llama.cpp"}, other, ref)
    assert (e["same_tokens"], e["same_chars"], e["identical"]) == (2, 3, False)
    section = {"teacher": "teacher", "source": "held-out", "max_tokens": 4, "prompts": [
        {"prompt": [{"role": "user", "content": "q"}],
         "answers": [answer_entry("teacher", {}, ref, None), e]}]}
    md = "\n".join(samples_markdown(section, md_cell))
    assert "| gguf-Q4\\_0 | 2 tokens | a b ▸ \\<x\\> … |" in md
    assert "a b<mark> &lt;x&gt;</mark> …" in samples_html(section)


def test_samples_are_reused_and_redone_only_by_their_keys(run, tmp_path):
    run_dir, args = run
    shutil.copytree(run_dir, tmp_path / "r")   # the module's run stays as the other tests read it
    args = [a for a in args if not a.startswith("out=")] + [f"out={tmp_path}"]
    again = subprocess.run([sys.executable, "-m", "compress", *args, "samples.tokens=6"], capture_output=True,
                           text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    made = [l.split()[2] for l in again.stderr.splitlines() if l.startswith("▶")]
    assert made and all(m.startswith("samples-") for m in made), made


@pytest.mark.parametrize("name,runtime", [("gguf-F16", "llama.cpp"), ("onnx-fp32", "onnxruntime")])
def test_chat_prompt_answers_once_in_the_artifact_runtime(run, tokenizer, name, runtime):
    run_dir, _ = run
    proc = subprocess.run([sys.executable, "-m", "compress", "chat", str(run_dir), name, "--prompt", "Hello there",
                           "--max-tokens", "10", "--threads", "1"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the same greedy answer, computed here from the same runtime
    rt = open_runtime(artifacts.load(run_dir / name), 1, vocab=len(tokenizer), n_ctx=256, all_logits=False)
    try:
        a = greedy(rt, chat_ids(tokenizer, [{"role": "user", "content": "Hello there"}]), 10, stop_ids(tokenizer))
    finally:
        rt.close()
    assert proc.stdout == tokenizer.decode(a.ids, skip_special_tokens=True) + "\n"
    assert f"[{name} in {runtime}: {len(a.ids)} tokens, " in proc.stderr and "tok/s" in proc.stderr


def test_chat_interactive_keeps_the_conversation(run, monkeypatch, capsys):
    import compress.evaluate.generate as generate
    run_dir, _ = run
    lines = iter(["Hi", "And again?", "/reset", "Fresh", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    asked = []
    real = generate.chat_ids
    monkeypatch.setattr(generate, "chat_ids", lambda tok, msgs: asked.append([m["content"] for m in msgs]) or real(tok, msgs))
    assert main(["chat", str(run_dir), "gguf-F16", "--max-tokens", "5", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert err.count("[gguf-F16 in llama.cpp:") == 3
    assert asked[0] == ["Hi"] and asked[1][0] == "Hi" and asked[1][-1] == "And again?" and len(asked[1]) == 3
    assert asked[2] == ["Fresh"]                          # /reset forgot the conversation


@pytest.mark.parametrize("argv,needle", [
    (["chat", "{run}", "gguf-Q9"], "has no artifact 'gguf-Q9'"),
    (["chat", "{run}", "gguf-F61"], "did you mean 'gguf-F16'"),
    (["chat", "{run}", "data"], "artifacts: distilled, gguf-F16, onnx-fp32, student, teacher"),
    (["chat", "{run}", "--max-tokens", "x"], "--max-tokens takes a whole number"),
    (["chat", "{run}", "--tokens", "3"], "unknown option --tokens"),
    (["chat", "no/such/run"], "is not a run directory"),
    (["chat"], "usage: compress chat"),
])
def test_chat_bad_input_is_one_line(run, argv, needle, capsys):
    run_dir, _ = run
    assert main([a.replace("{run}", str(run_dir)) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and needle in err, err


def test_chat_prompt_longer_than_the_context_is_one_line(run, capsys):
    run_dir, _ = run
    assert main(["chat", str(run_dir), "gguf-F16", "--prompt", "word " * 600, "--max-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the 512-token context leaves 504 with --max-tokens 8" in err, err


def test_long_held_out_prompts_are_passed_over(tokenizer):
    from compress.evaluate.samples import pick
    convs = [[{"role": "user", "content": "word " * n}] for n in (5, 400, 6, 7)]
    kept, ids, skipped = pick(tokenizer, convs, 2, 100)
    assert [c[0]["content"] for c in kept] == ["word " * 5, "word " * 6] and skipped == 1
    assert all(len(i) <= 100 for i in ids)


def test_a_teacher_without_chat_template_continues_plain_text(tokenizer):
    import copy
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    ids = chat_ids(base, [{"role": "user", "content": "Once upon a time"}])
    assert base.decode(ids, skip_special_tokens=True) == "Once upon a time"


def test_text_stream_holds_back_incomplete_characters(tokenizer):
    ids = tokenizer("naïve café 東京", add_special_tokens=False)["input_ids"]
    s = TextStream(tokenizer)
    shown = "".join(s.add(t) for t in ids)
    assert shown == "naïve café 東京" and "\ufffd" not in shown
