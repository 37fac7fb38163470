"""Resume/skip logic of the pipeline runner and atomic artifact writes."""
import pytest

from compress import artifacts
from compress.config import load_config
from compress.pipeline import Runner


def make_stage(calls, stage):
    def fn(cfg, src, out, **inputs):
        calls.append(out.name)
        with artifacts.writing(out, stage=stage, config={"v": cfg.distill.tokens}, format="hf",
                               parents=[src, *inputs.values()]) as (tmp, meta):
            (tmp / "weights.bin").write_bytes(b"x" * 10)
        return artifacts.load(out)
    return fn


def pipeline(cfg, calls):
    r = Runner(cfg)
    conf = {"v": cfg.distill.tokens}
    a = r.step("teacher", "a", make_stage(calls, "teacher"), conf, [])
    b = r.step("distill", "b", make_stage(calls, "distill"), conf, [a], src=a)
    c = r.step("evaluate", "c", make_stage(calls, "evaluate"), conf, [a], src=a)
    d = r.step("export", "d", make_stage(calls, "export"), conf, [b], src=b)
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
