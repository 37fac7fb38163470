"""Report: budgets, Pareto, the pick, estimates, rendering and compare, on run directories whose
meta.json files are written by the real artifact writer (numbers chosen so every outcome is known).
"""
from __future__ import annotations

import io
import json
import re

import pytest

from compress import artifacts
from compress.config import RunConfig
from compress.errors import UserError
from compress.report import build, compare, print_table, write

MB = 1_000_000


# ---------------------------------------------------------------- fake-but-realistic run dirs

def make_run(root, name="r", profile="phone", device=None, budgets=None, dirname=None):
    cfg = RunConfig(name=name, profile=profile).to_dict()
    cfg["device"].update(device or {})
    cfg["budgets"].update(budgets or {})
    run = root / (dirname or name)
    run.mkdir(parents=True)
    artifacts.write_json_atomic(run / "meta.json", {"name": name, "stage": "run", "config": cfg})
    return run


def add_model(run, name, fmt, nbytes, params=None, parent=None, stage=None, quant=None):
    """An hf dir (one weights file) or a gguf dir (model.gguf + Modelfile) of exactly nbytes."""
    parents = [artifacts.load(run / parent)] if parent else []
    stage = stage or ("quantize" if fmt == "gguf" else "distill")
    file = "model.gguf" if fmt == "gguf" else "."
    with artifacts.writing(run / name, stage=stage, config={"q": quant}, parents=parents,
                           format=fmt, quant=quant, file=file) as (tmp, meta):
        with open(tmp / ("model.gguf" if fmt == "gguf" else "model.safetensors"), "wb") as f:
            f.truncate(nbytes)   # a real (sparse) file of exactly this size
        if fmt == "gguf":
            (tmp / "Modelfile").write_text("FROM ./model.gguf\n")
        meta["params"] = params
    return artifacts.load(run / name)


def add_eval(run, name, kld, ppl=10.0, top1=0.8, rss=100.0, prefill=500.0, decode=50.0, threads=2):
    art = artifacts.load(run / name)
    metrics = {"artifact": name, "format": art.meta["format"],
               "runtime": "llama.cpp" if art.meta["format"] == "gguf" else "torch",
               "quality": {"ppl": ppl, "kld": kld, "top1": top1, "tasks": {}},
               "speed": {"threads": threads, "prefill_tps": prefill, "decode_tps": decode,
                         "ttft_ms": 12.5, "load_warning": None},
               "memory": {"peak_rss_mb": rss}, "eval_tokens": 2048,
               "host": {"cpu": "Test CPU", "cores": 2}}
    with artifacts.writing(run / f"eval-{name}", stage="evaluate", config={"seqs": 16}, parents=[art],
                           format="eval") as (tmp, meta):
        (tmp / "eval.json").write_text(json.dumps(metrics))
        meta["metrics"] = metrics


def by_name(report):
    return {a["name"]: a for a in report["artifacts"]}


def standard_run(tmp_path, budgets=None, device=None, name="r"):
    """teacher 2 MB -> distilled 1.5 MB -> F16 1.2 MB -> Q4 0.6 MB / Q2 0.4 MB, all evaluated."""
    run = make_run(tmp_path, name=name, device=device or {"name": "phone", "bandwidth_gbs": 0.1},
                   budgets=budgets)
    add_model(run, "teacher", "hf", 2 * MB, params=500_000, stage="teacher", quant="fp32")
    add_model(run, "distilled", "hf", int(1.5 * MB), params=300_000, parent="teacher", quant="fp32")
    add_model(run, "gguf-F16", "gguf", int(1.2 * MB), parent="distilled", stage="export", quant="F16")
    add_model(run, "gguf-Q4_K_M", "gguf", int(0.6 * MB), parent="gguf-F16", quant="Q4_K_M")
    add_model(run, "gguf-Q2_K", "gguf", int(0.4 * MB), parent="gguf-F16", quant="Q2_K")
    for n, kld, rss in (("teacher", 0.0, 900.0), ("distilled", 0.08, 700.0), ("gguf-F16", 0.1, 250.0),
                        ("gguf-Q4_K_M", 0.3, 200.0), ("gguf-Q2_K", 0.9, 350.0)):
        add_eval(run, n, kld, rss=rss)
    return run


# ---------------------------------------------------------------- budgets and the pick

def test_budgets_pass_and_fail_with_reasons(tmp_path):
    # bandwidth 0.1 GB/s: F16 (1.2 MB) -> 83.3 tok/s, Q4 (0.6 MB) -> 166.7, Q2 (0.4 MB) -> 250.
    run = standard_run(tmp_path, budgets={"max_size_mb": 1.0, "max_kld": 0.5,
                                          "max_peak_rss_mb": 300, "min_decode_tps": 100})
    arts = by_name(build(run))
    f16, q4, q2 = arts["gguf-F16"]["budget"], arts["gguf-Q4_K_M"]["budget"], arts["gguf-Q2_K"]["budget"]
    assert q4 == q4 | {"pass": True, "failed": [], "unchecked": []}
    assert f16["pass"] is False
    assert any("size 1.20 MB > max 1 MB" in r for r in f16["failed"]), f16["failed"]
    assert any("decode (estimated for phone) 83.3 tok/s < min 100 tok/s" in r for r in f16["failed"]), f16["failed"]
    assert len(f16["failed"]) == 2   # KLD 0.1 and RSS 250 MB are within budget
    assert q2["pass"] is False
    assert sorted(r.split(" ")[0] for r in q2["failed"]) == ["KLD", "peak"]
    assert any("0.900 nats/token > max 0.5" in r for r in q2["failed"]), q2["failed"]
    assert any("350 MB > max 300 MB" in r for r in q2["failed"]), q2["failed"]


def test_recommends_best_quality_that_passes(tmp_path):
    run = standard_run(tmp_path, budgets={"max_size_mb": 1.0, "max_kld": 0.5})
    report = build(run)
    # F16 is closer to the teacher but too big; Q4 is the best of those within budget.
    assert report["recommended"] == "gguf-Q4_K_M"
    assert "gguf-Q4_K_M" in report["recommendation_reason"]
    assert [a["name"] for a in report["artifacts"] if a["recommended"]] == ["gguf-Q4_K_M"]


def test_tie_on_quality_picks_smaller(tmp_path):
    run = make_run(tmp_path)
    add_model(run, "teacher", "hf", 2 * MB, params=10, stage="teacher")
    add_model(run, "big", "gguf", 2 * MB, parent="teacher")
    add_model(run, "small", "gguf", 1 * MB, parent="teacher")
    for n in ("teacher", "big", "small"):
        add_eval(run, n, kld=0.0 if n == "teacher" else 0.2)
    assert build(run)["recommended"] == "small"


def test_none_recommended_when_all_fail_names_nearest_miss(tmp_path):
    run = standard_run(tmp_path, budgets={"max_size_mb": 0.3})
    report = build(run)
    assert report["recommended"] is None
    assert all(a["budget"]["pass"] is False for a in report["artifacts"])
    reason = report["recommendation_reason"]
    assert "nearest miss: gguf-Q2_K" in reason and "0.400 MB > max 0.3 MB" in reason, reason


def test_teacher_never_recommended(tmp_path):
    run = standard_run(tmp_path)   # no budgets: everything passes; the teacher has KLD 0
    report = build(run)
    assert by_name(report)["teacher"]["budget"]["pass"] is True
    assert report["recommended"] == "distilled"   # the best non-teacher
    only = make_run(tmp_path, name="only")
    add_model(only, "teacher", "hf", MB, params=10, stage="teacher")
    add_eval(only, "teacher", kld=0.0)
    report = build(only)
    assert report["recommended"] is None and "teacher" in report["recommendation_reason"]


# ---------------------------------------------------------------- Pareto and estimates

def test_pareto_marks_the_dominated_artifact(tmp_path):
    run = make_run(tmp_path)
    add_model(run, "teacher", "hf", 2 * MB, params=10, stage="teacher")
    add_model(run, "a", "gguf", 1 * MB, parent="teacher")
    add_model(run, "b", "gguf", int(0.8 * MB), parent="teacher")
    add_model(run, "c", "gguf", int(0.9 * MB), parent="teacher")      # bigger and worse than b
    add_model(run, "unevaluated", "gguf", int(0.1 * MB), parent="teacher")
    for n, kld in (("teacher", 0.0), ("a", 0.1), ("b", 0.2), ("c", 0.3)):
        add_eval(run, n, kld)
    marks = {n: a["pareto"] for n, a in by_name(build(run)).items()}
    assert marks == {"teacher": True, "a": True, "b": True, "c": False, "unevaluated": False}


def test_estimates_come_from_device_facts(tmp_path):
    run = make_run(tmp_path, device={"name": "board", "bandwidth_gbs": 10.0, "compute_gflops": 2.0})
    add_model(run, "teacher", "hf", 300 * MB, params=3_000_000, stage="teacher")
    add_model(run, "gguf-F16", "gguf", 100 * MB, params=1_000_000, parent="teacher", stage="export")
    add_model(run, "gguf-Q4_0", "gguf", 50 * MB, parent="gguf-F16", quant="Q4_0")   # params inherited
    add_eval(run, "gguf-F16", kld=0.01, prefill=321.0, decode=12.0)
    arts = by_name(build(run))
    est = arts["gguf-F16"]["estimate"]
    assert est["decode_tps"] == pytest.approx(100.0)      # 10 GB/s / 100 MB
    assert est["prefill_tps"] == pytest.approx(1000.0)    # 2 GFLOP/s / (2 * 1e6)
    assert est["basis"]["decode_tps"].startswith("estimate") and "10.0 GB/s" in est["basis"]["decode_tps"]
    assert est["device"] == "board"
    # measured figures stay the measured ones, separate from the estimate
    assert arts["gguf-F16"]["speed"]["decode_tps"] == 12.0 and arts["gguf-F16"]["speed"]["prefill_tps"] == 321.0
    assert arts["gguf-Q4_0"]["params"] == 1_000_000
    assert arts["gguf-Q4_0"]["estimate"]["decode_tps"] == pytest.approx(200.0)


def test_missing_eval_gives_nulls_and_still_renders(tmp_path):
    run = make_run(tmp_path, budgets={"max_kld": 0.5})
    add_model(run, "teacher", "hf", MB, params=10, stage="teacher")
    add_model(run, "gguf-Q8_0", "gguf", MB // 2, parent="teacher", quant="Q8_0")
    report = build(run)
    q8 = by_name(report)["gguf-Q8_0"]
    assert q8["quality"] == {"ppl": None, "kld": None, "top1": None, "ood": None, "tasks": {}}
    assert q8["speed"]["decode_tps"] is None and q8["memory"]["peak_rss_mb"] is None
    assert q8["budget"]["pass"] is None and q8["budget"]["unchecked"]
    assert q8["pareto"] is False and report["recommended"] is None
    assert "evaluate" in report["recommendation_reason"]
    paths = write(run)
    assert "n/a" in paths["md"].read_text()
    json.loads(paths["json"].read_text())   # no NaN/inf sneaks into the JSON


def test_stale_eval_is_ignored_with_warning(tmp_path):
    run = make_run(tmp_path)
    add_model(run, "teacher", "hf", MB, params=10, stage="teacher")
    add_model(run, "q", "gguf", MB // 2, parent="teacher", quant="Q8_0")
    add_eval(run, "q", kld=0.1)
    add_model(run, "q", "gguf", MB // 4, parent="teacher", quant="Q4_0")   # remade after its eval
    report = build(run)
    assert by_name(report)["q"]["quality"]["kld"] is None
    assert any("older version of q" in w for w in report["warnings"])


def test_run_commands(tmp_path):
    run = standard_run(tmp_path)
    arts = by_name(build(run))
    g = arts["gguf-Q4_K_M"]["run"]
    assert g["llama_cpp"].startswith("llama-cli -m ") and g["llama_cpp"].split()[2].endswith("gguf-Q4_K_M/model.gguf")
    assert g["modelfile"].endswith("Modelfile") and g["ollama"] == f"ollama create r-gguf-q4_k_m -f {g['modelfile']}"
    assert "from_pretrained" in arts["distilled"]["run"]["python"]


def test_not_a_run_dir(tmp_path):
    run = standard_run(tmp_path)
    with pytest.raises(UserError, match="not a run directory"):
        build(run / "teacher")         # an artifact, not a run
    with pytest.raises(UserError, match="not a run directory"):
        build(tmp_path / "nothing")


# ---------------------------------------------------------------- files and terminal

def test_write_all_files(tmp_path):
    run = standard_run(tmp_path, budgets={"max_size_mb": 1.0})
    paths = write(run)
    assert {k: p.is_file() for k, p in paths.items()} == {"json": True, "md": True, "html": True, "png": True}
    assert json.loads(paths["json"].read_text()) == build(run)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md, page = paths["md"].read_text(), paths["html"].read_text()
    assert "| Artifact | Format (runtime) | Size MB |" in md and "gguf-Q4\\_K\\_M ★" in md and "llama-cli -m" in md
    assert 'src="data:image/png;base64,' in page and 'class="rec"' in page
    assert not [p for p in run.iterdir() if p.name.startswith(".")]   # no temporaries left behind


def test_html_escapes_user_text(tmp_path):
    evil = "<script>alert(1)</script>"
    run = make_run(tmp_path, name=evil, profile=evil, dirname="evil", device={"name": evil})
    add_model(run, "teacher", "hf", MB, params=10, stage="teacher")
    add_model(run, "<img src=x onerror=alert(2)>", "gguf", MB // 2, parent="teacher")
    add_eval(run, "<img src=x onerror=alert(2)>", kld=0.1)
    paths = write(run)
    page = paths["html"].read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    assert not re.search(r"(?<!\\)<script", paths["md"].read_text())   # only escaped (\\<)
    buf = io.StringIO()
    from rich.console import Console
    print_table(build(run), Console(file=buf, width=250))
    assert "alert(1)" in buf.getvalue()   # printed literally (a file gets plain text) ...
    buf = io.StringIO()
    print_table(build(run), Console(file=buf, width=250, force_terminal=True, color_system=None))
    assert "alert(1)" in buf.getvalue()   # ... and in a terminal, not swallowed as rich markup


def test_print_table(tmp_path):
    from rich.console import Console
    run = standard_run(tmp_path, budgets={"max_size_mb": 1.0})
    buf = io.StringIO()
    print_table(build(run), Console(file=buf, width=250))
    out = buf.getvalue()
    assert "gguf-Q2_K" in out and "Recommended: gguf-Q4_K_M" in out and "llama-cli" in out


def test_compare_two_runs(tmp_path):
    from rich.console import Console
    a = standard_run(tmp_path / "runs", name="a", budgets={"max_size_mb": 1.0})
    b = make_run(tmp_path / "runs", name="b")
    add_model(b, "teacher", "hf", 2 * MB, params=10, stage="teacher")
    add_model(b, "gguf-Q4_0", "gguf", int(0.5 * MB), parent="teacher", quant="Q4_0")
    add_eval(b, "teacher", 0.0)
    add_eval(b, "gguf-Q4_0", 0.25)   # smaller and closer than a's Q4_K_M: dominates it
    buf = io.StringIO()
    result = compare([a, b], out_dir=tmp_path / "cmp", console=Console(file=buf, width=250))
    names = [x["name"] for x in result["artifacts"]]
    assert "a/gguf-Q4_K_M" in names and "b/gguf-Q4_0" in names and len(names) == 7
    pareto = {x["name"]: x["pareto"] for x in result["artifacts"]}
    assert pareto["b/gguf-Q4_0"] and not pareto["a/gguf-Q4_K_M"]
    assert [r["recommended"] for r in result["runs"]] == ["gguf-Q4_K_M", "gguf-Q4_0"]
    assert (tmp_path / "cmp" / "compare.md").read_text().count("b/gguf-Q4\\_0") == 1
    assert "data:image/png;base64," in (tmp_path / "cmp" / "compare.html").read_text()
    assert "a/gguf-Q2_K" in buf.getvalue()
    with pytest.raises(UserError, match="not a run directory"):
        compare([a, tmp_path / "cmp"], out_dir=tmp_path / "cmp2")
