"""Resume/skip logic of the pipeline runner and atomic artifact writes."""
import pytest

from compress import artifacts
from compress.config import load_config
from compress.pipeline import Runner
from compress.stage import stage


def make_stage(calls, name, inputs=()):
    @stage(name, inputs=inputs, reads=("distill.tokens",), format="hf")
    def fn(cfg, src, out, **inputs):
        calls.append(out.name)
        with artifacts.writing(out) as (tmp, meta):
            (tmp / "weights.bin").write_bytes(b"x" * cfg.distill.tokens)
        return artifacts.load(out)
    return fn


def pipeline(cfg, calls):
    r = Runner(cfg)
    a = r.step(make_stage(calls, "teacher"), "a")
    b = r.step(make_stage(calls, "distill"), "b", src=a)
    c = r.step(make_stage(calls, "evaluate"), "c", src=a)
    d = r.step(make_stage(calls, "export"), "d", src=b)
    return a, b, c, d


def cfg_for(tmp_path, *extra):
    return load_config([f"out={tmp_path}", "name=r", "distill.tokens=5", *extra])


def test_rerun_reuses_finished_stages(tmp_path):
    calls = []
    pipeline(cfg_for(tmp_path), calls)
    assert calls == ["a", "b", "c", "d"]
    calls.clear()
    pipeline(cfg_for(tmp_path), calls)
    assert calls == []


def test_changed_config_redoes_stages(tmp_path):
    calls = []
    pipeline(cfg_for(tmp_path), calls)
    calls.clear()
    pipeline(cfg_for(tmp_path, "distill.tokens=6"), calls)
    assert calls == ["a", "b", "c", "d"]


def test_stages_redo_a_stage_and_its_dependents_only(tmp_path):
    calls = []
    pipeline(cfg_for(tmp_path), calls)
    calls.clear()
    pipeline(cfg_for(tmp_path, "stages=[distill]"), calls)
    assert calls == ["b", "d"]
    calls.clear()
    pipeline(cfg_for(tmp_path, "force=true"), calls)
    assert calls == ["a", "b", "c", "d"]


def test_runner_records_what_each_artifact_cost(tmp_path):
    from compress.report.quality import cost
    a, b, c, d = pipeline(cfg_for(tmp_path), [])
    for art in (a, b, c, d):
        assert art.meta["cost"]["device"] == "cpu" and art.meta["cost"]["wall_s"] >= 0
        assert art.meta["cost"]["peak_rss_mb"] > 10     # this Python process, at least
    got = cost("d", {x.name: x.meta for x in (a, b, c, d)})
    assert list(got["stages"]) == ["teacher", "distill", "export"]   # c (evaluate) is not in d's recipe
    assert got["total_s"] == pytest.approx(sum(x.meta["cost"]["wall_s"] for x in (a, b, d)), abs=0.01)
    assert got["summary"].startswith("teacher ") and " + distill " in got["summary"]
    assert b.meta["config"] == {"distill.tokens": 5} and [p["name"] for p in d.meta["parents"]] == ["b"]


def test_failed_write_leaves_nothing_that_looks_finished(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError):
        with artifacts.writing(out, stage="x", config={}, parents=[], format="hf") as (tmp, meta):
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_stale_temporary_dirs_are_cleaned(tmp_path):
    (tmp_path / ".art.tmp-123").mkdir()
    (tmp_path / ".art.tmp-123" / "w.bin").write_bytes(b"x")
    artifacts.clean_stale(tmp_path)
    assert not list(tmp_path.iterdir())


def test_corrupt_meta_is_a_user_error(tmp_path):
    from compress.errors import UserError
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        artifacts.load(tmp_path / "a")


STAGE_SRC = '''
from compress import artifacts
from compress.stage import stage
from .helper import FILL

CALLS = []

@stage("export", reads=("distill.tokens",), format="gguf")
def run(cfg, src, out):
    CALLS.append(out.name)
    with artifacts.writing(out) as (tmp, meta):
        (tmp / "model.bin").write_bytes(FILL * cfg.distill.tokens)
    return artifacts.load(out)
'''


def test_changed_stage_code_redoes_its_artifacts(tmp_path, monkeypatch):
    """An upgraded (or edited) stage does not reuse what its older code made; config alone is not
    the identity. A change anywhere in the stage's package counts (here its helper module)."""
    import importlib
    import sys

    from compress.stage import code_digest
    pkg = tmp_path / "src" / "stagepkg_code"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STAGE_SRC)
    (pkg / "helper.py").write_text("FILL = b'x'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    mod = importlib.import_module("stagepkg_code")
    try:
        cfg = cfg_for(tmp_path / "runs")
        first = Runner(cfg).step(mod.run, "e")
        assert first.meta["code"] == code_digest("stagepkg_code") and len(first.meta["code"]) == 16
        Runner(cfg).step(mod.run, "e")
        assert mod.CALLS == ["e"]                       # same code, same config: reused
        (pkg / "helper.py").write_text("FILL = b'y'\n")   # the helper changes, the stage's file does not
        code_digest.cache_clear()
        again = Runner(cfg).step(mod.run, "e")
        assert mod.CALLS == ["e", "e"] and again.meta["code"] != first.meta["code"]
        assert again.meta["hash"] != first.meta["hash"]
    finally:
        code_digest.cache_clear()
        sys.modules.pop("stagepkg_code", None)
