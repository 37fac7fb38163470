"""`compress run` end to end on the real built-in teacher with a tiny budget, then a warm re-run."""
import json
import subprocess
import sys
import time

import pytest

from conftest import SHARED

TINY = ["gen.prompts=8", "gen.max_new_tokens=200", "student.layers=4", "distill.tokens=1024",
        "distill.seq_len=128", "distill.batch=2", "distill.checkpoint_every=2",
        "quantize.gguf=[Q8_0,Q4_K_M,auto]", "quantize.imatrix_tokens=512",
        "eval.seqs=2", "eval.seq_len=64", "eval.prefill_tokens=32", "eval.decode_tokens=8", "eval.threads=1",
        "qad.tokens=1024", "qad.lr=0.003"]
# The phone profile's benchmark task over the local copy (offline); without it, no tasks.
TINY += ([f"eval.task_data={SHARED}", "eval.limit=8"] if (SHARED / "arc_easy").is_dir() else ["eval.tasks=[]"])


def compress(*args, cwd):
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


@pytest.fixture(scope="module")
def phone_run(tmp_path_factory, teacher_gguf):
    cwd = tmp_path_factory.mktemp("e2e")
    t0 = time.time()
    proc = compress("run", "profile=phone", "name=tiny", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, proc, time.time() - t0


def test_run_writes_every_artifact_and_a_complete_report(phone_run):
    cwd, proc, _ = phone_run
    run = cwd / "runs" / "tiny"
    for name in ("teacher", "data", "student", "distilled", "gguf-F16", "gguf-Q8_0", "gguf-Q4_K_M"):
        meta = json.loads((run / name / "meta.json").read_text())
        assert meta["name"] == name and meta["hash"] and meta["versions"]["torch"]
    for name in ("gguf-F16", "gguf-Q8_0", "gguf-Q4_K_M"):
        assert (run / name / "model.gguf").stat().st_size > 10_000_000
        assert "FROM" in (run / name / "Modelfile").read_text()
    report = json.loads((run / "report.json").read_text())
    arts = {a["name"]: a for a in report["artifacts"]}
    assert {"teacher", "student", "distilled", "gguf-F16", "gguf-Q8_0", "gguf-Q4_K_M"} <= set(arts)
    for a in arts.values():
        for key in ("name", "format", "quant", "path", "parent", "size_mb", "params", "quality", "speed",
                    "memory", "estimate", "budget", "pareto"):
            assert key in a, (a["name"], key)
        assert a["quality"]["ppl"] > 1 and 0 <= a["quality"]["top1"] <= 1
        assert a["speed"]["decode_tps"] > 0 and a["memory"]["peak_rss_mb"] > 0
    assert arts["teacher"]["quality"]["kld"] < 1e-3
    # a 4-layer student is much worse than the teacher; quantization moves it only a little further
    assert arts["student"]["quality"]["kld"] > 0.1
    assert arts["gguf-Q4_K_M"]["size_mb"] < arts["gguf-Q8_0"]["size_mb"] < arts["gguf-F16"]["size_mb"]
    assert abs(arts["gguf-F16"]["quality"]["kld"] - arts["distilled"]["quality"]["kld"]) < 0.05
    # the quantized teacher is the baseline: F16 matches it, Q8_0 stays close
    assert arts["teacher-gguf-F16"]["quality"]["kld"] < 0.01
    assert arts["teacher-gguf-Q8_0"]["quality"]["kld"] < 0.05
    assert arts["teacher-gguf-Q8_0"]["quality"]["top1"] > 0.9
    # the auto mix fills the phone's 120 MB with a type per tensor, and loses less than Q4_K_M
    auto = arts["teacher-gguf-auto"]
    assert auto["quant"] == "auto:120MB" and 100 < auto["size_mb"] <= 120
    assert auto["quality"]["kld"] < arts["teacher-gguf-Q4_K_M"]["quality"]["kld"]
    mix = json.loads((run / "teacher-gguf-auto" / "meta.json").read_text())["metrics"]
    assert len(set(mix["tensors"].values())) > 1 and mix["predicted_kld"] >= 0 and mix["measured_kld"] > 0
    assert arts["gguf-auto"]["size_mb"] <= 120
    # the phone profile tunes the teacher's Q4_0 (a type quantize.gguf does not list: built for it)
    plain, tuned = arts["teacher-gguf-Q4_0"], arts["teacher-gguf-Q4_0-qad"]
    assert tuned["size_mb"] == plain["size_mb"] and tuned["quality"]["kld"] < plain["quality"]["kld"]
    assert "gguf-Q4_0" not in arts and "gguf-Q4_0-qad" not in arts        # qad.of=[teacher]
    qad_meta = json.loads((run / "teacher-gguf-Q4_0-qad" / "meta.json").read_text())["metrics"]
    assert qad_meta["tokens"] == 1024 and qad_meta["shipped"] == "tuned" and qad_meta["seconds"] > 0
    assert {r["name"]: r["recipe"] for r in report["compression"]}["teacher-gguf-Q4_0-qad"] == "teacher + GGUF Q4_0 + QAD"
    assert "recommended" in report
    cost = {r["name"]: r["cost"] for r in report["compression"]}["gguf-Q4_K_M"]   # what the recipe took
    assert {"teacher", "data", "student", "distill", "export", "imatrix", "quantize"} == set(cost["stages"])
    assert cost["stages"]["distill"]["wall_s"] > 0 and cost["peak_rss_mb"] > 100 and "distill" in cost["summary"]
    if (SHARED / "arc_easy").is_dir():   # the phone profile's task, on every artifact, in its runtime
        for a in arts.values():
            t = a["quality"]["tasks"]["arc_easy"]
            assert t["n"] == 8 and t["chance"] == 0.25 and 0 <= t["value"] <= 1, a["name"]
        assert report["tasks"]["arc_easy"]["teacher"] == arts["teacher"]["quality"]["tasks"]["arc_easy"]["value"]
        assert abs(arts["teacher-gguf-F16"]["quality"]["tasks"]["arc_easy"]["value"]
                   - arts["teacher"]["quality"]["tasks"]["arc_easy"]["value"]) <= arts["teacher"]["quality"]["tasks"]["arc_easy"]["stderr"]
    assert arts["distilled"]["quality"]["ood"]["kld"] > 0 and report["compression"][0]["name"] == "teacher"
    for f in ("report.md", "report.html"):
        assert (run / f).stat().st_size > 500
    assert "report.html" in proc.stderr + proc.stdout
    # every artifact answers the held-out prompts beside the teacher, in its own runtime
    samples = report["samples"]
    assert samples["source"] == "held-out" and samples["prompts"]
    assert {a["artifact"] for a in samples["prompts"][0]["answers"]} == set(arts)
    assert "## Sample answers" in (run / "report.md").read_text()
    # a log file reads cleanly: no library progress bars, the table one plain line per artifact
    assert "Converting and de-quantizing" not in proc.stderr and "it/s]" not in proc.stderr
    assert any(l.startswith("| teacher ") for l in proc.stdout.splitlines()), proc.stdout[:2000]


def test_warm_rerun_skips_every_stage(phone_run):
    cwd, _, _ = phone_run
    t0 = time.time()
    proc = compress("run", "profile=phone", "name=tiny", *TINY, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "▶" not in proc.stderr, proc.stderr          # nothing re-made
    assert proc.stderr.count("reused") >= 20


def test_every_key_redoes_exactly_the_stages_that_read_it(phone_run):
    """Each config key changed in turn: the runner's plan redoes the stages that declare it (the
    only keys a stage can read) and what depends on them, and reuses everything else."""
    from test_contracts import check_every_key
    cwd, _, _ = phone_run
    base = ["profile=phone", "name=tiny", f"out={cwd / 'runs'}", *TINY]
    assert check_every_key(base, cwd / "runs" / "tiny") > 60


def test_changed_quant_list_only_adds_the_new_artifact(phone_run):
    cwd, _, _ = phone_run
    args = [a for a in TINY if not a.startswith("quantize.gguf")] + ["quantize.gguf=[Q8_0,Q4_K_M,auto,Q4_1]"]
    proc = compress("run", "profile=phone", "name=tiny", *args, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = [l.split()[2] for l in proc.stderr.splitlines() if l.startswith("▶")]
    assert made == ["gguf-Q4_1", "teacher-gguf-Q4_1", "eval-gguf-Q4_1", "eval-teacher-gguf-Q4_1",
                    "samples-gguf-Q4_1", "samples-teacher-gguf-Q4_1"], made


def test_compare_two_runs(phone_run, tmp_path):
    cwd, _, _ = phone_run
    run = cwd / "runs" / "tiny"
    proc = compress("compare", str(run), str(run), "--out", str(tmp_path), cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.html").is_file()


@pytest.mark.parametrize("args,needle", [
    (["run", "profile=phon"], "did you mean 'phone'"),
    (["run", "teacher=/no/such/dir"], "does not exist"),
    (["run", "distill.tokns=1"], "did you mean 'distill.tokens'"),
])
def test_bad_input_one_line_nonzero_and_nothing_written(tmp_path, args, needle):
    proc = compress(*args, "name=bad", cwd=tmp_path)
    assert proc.returncode == 2
    assert needle in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "runs" / "bad").exists()


def test_unsupported_architecture_and_empty_data_are_one_line_errors(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer))).save_pretrained(gpt2)
    proc = compress("run", f"teacher={gpt2}", "name=arch", cwd=tmp_path)
    assert proc.returncode == 2 and "unsupported architecture 'gpt2'" in proc.stderr
    assert "llama" in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not list((tmp_path / "runs" / "arch").glob("*/meta.json"))

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = compress("run", f"data={empty}", "name=empty", cwd=tmp_path)
    assert proc.returncode == 2 and "holds no text" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert not (tmp_path / "runs" / "empty").exists()


def test_local_hf_directory_works_as_teacher(tmp_path, tiny_llama):
    from compress import teacher
    from compress.config import load_config
    cfg = load_config([f"teacher={tiny_llama.path}", f"out={tmp_path}", "name=local"])
    art = teacher.run(cfg, None, tmp_path / "local" / "teacher")
    assert art.meta["format"] == "hf" and art.meta["metrics"]["source_gguf"] is None
    assert art.meta["params"] == tiny_llama.meta["params"]
