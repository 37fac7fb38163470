"""The stage contract: declared keys are the only ones a stage can read, and exactly what it hashes."""
import json

import pytest

from compress import artifacts
from compress.config import STAGES, load_config
from compress.errors import UserError
from compress.pipeline import plan
from compress.config import RunConfig
from compress.keys import walk
from compress.stage import ConfigView, UndeclaredKey, stage


all_keys = [k for k, _ in walk(RunConfig)]   # every leaf key of the run config, e.g. 'distill.lr'


def fake(name: str, h: str = "0" * 16, fmt: str = "hf") -> artifacts.Artifact:
    """An artifact as a parent: only its name and hash take part in a child's identity."""
    return artifacts.Artifact(artifacts.Path("/nonexistent") / name, {"name": name, "hash": h, "format": fmt})


def test_reading_an_undeclared_key_is_an_error(tmp_path):
    @stage("export", reads=("export.gguf",), format="gguf")
    def leaky(cfg, src, out):
        return cfg.quantize.gguf

    with pytest.raises(UndeclaredKey, match="stage 'export' read config key 'quantize'"):
        leaky(load_config([]), None, tmp_path / "x")
    view = ConfigView(load_config([]), ("distill.lr", "eval"), "distill")
    assert view.distill.lr == 2e-4 and view.eval.seqs == 16 and view.section("distill") == {"lr": 2e-4}
    with pytest.raises(UndeclaredKey, match="'distill.tokens'"):
        view.distill.tokens
    with pytest.raises(AttributeError):
        view.distill = None


def test_a_stage_cannot_reach_undeclared_keys_through_another_stage_or_a_default(tmp_path):
    @stage("reference", reads=("eval.seqs", "eval.ood"), format="logprobs")
    def inner(cfg, src, out):
        return cfg.eval.ood

    @stage("evaluate", reads=("eval.seqs",), format="eval")
    def outer(cfg, src, out):
        return inner(cfg, src, out)

    with pytest.raises(UndeclaredKey, match="'eval.ood'"):
        outer(load_config([]), None, tmp_path / "x")
    view = ConfigView(load_config([]), ("eval.seqs",), "evaluate")
    with pytest.raises(UndeclaredKey):
        getattr(view.eval, "ood", None)   # not an AttributeError: a default cannot hide the read


def test_every_stage_declares_real_keys_and_is_a_pipeline_stage(tmp_path):
    keys = set(all_keys)
    sections = {k.split(".")[0] for k in keys}
    configs = [[], ["export.onnx=fp32", "quantize.onnx=[int8,int4]", "export.layout=transformers.js",
                    "quantize.bnb=[int8]"], ["prune.params=0.5", "distill.mode=seqkd"], ["data=x.txt", "eval.ood=none"],
               ["budgets.max_size_mb=80", "quantize.gguf=[Q4_0,auto,auto:30%]"],
               ["export.onnx=fp32", "qad.types=[Q4_0,int4]"]]
    seen = set()
    for extra in configs:
        for step in plan(load_config([f"out={tmp_path}", "name=r", *extra])):
            seen.add(step.stage)
            assert step.redo   # nothing on disk yet
            for k in step.keys:
                assert k in keys or k in sections, (step.stage, k)
    assert seen == set(STAGES)


def test_the_three_formerly_unhashed_reads_are_hashed():
    teacher, data = fake("teacher", "1" * 16), fake("data", "2" * 16, "data")
    from compress.data import run as data_stage
    from compress.distill.train import run as distill
    from compress.student.subset import run as subset

    def changes(fn, base, key_value, src, **inputs):
        a = fn.stage.identity(load_config(base), src, **inputs).hash
        return a != fn.stage.identity(load_config(base + [key_value]), src, **inputs).hash

    # A given student keeps its own tokenizer only under sequence-level KD.
    assert changes(subset, ["student.model=some/dir"], "distill.mode=seqkd", teacher, data=data)
    # Sequence-level KD samples with gen.*; logit distillation does not read it.
    assert changes(distill, ["distill.mode=seqkd"], "gen.temperature=0.3", fake("student"), teacher=teacher, data=data)
    assert not changes(distill, [], "gen.temperature=0.3", fake("student"), teacher=teacher, data=data)
    # The held-out split of user data; generation settings do not matter when data= is given.
    assert changes(data_stage, ["data=my.jsonl"], "gen.heldout=0.3", teacher)
    assert "gen" in data_stage.stage.keys(load_config(['data=""']))   # an empty data= generates
    assert not changes(data_stage, ["data=my.jsonl"], "gen.prompts=7", teacher)


# ---------------------------------------------------------------- every key, in turn

# Run controls decide where and whether stages run, not what an artifact is.
CONTROLS = {"name", "out", "profile", "stages", "force", "preflight"}
# Changes that need a specific valid value, or another key set with them to be a valid config.
SPECIAL = {
    "teacher": ["teacher=some/other-teacher"], "data": ["data=my.jsonl"], "student.model": ["student=some/dir"],
    "student.select": ["student.select=even"], "prune.params": ["prune.params=0.5"],
    "prune.depth_metric": ["prune.depth_metric=loss"], "distill.loss": ["distill.loss=fkl:0.5,ce:0.5"],
    "distill.schedule": ["distill.schedule=cosine"],
    "distill.teacher_cache": ["distill.teacher_cache=topk:8", "distill.loss=topk:0.9,ce:0.1"],
    "distill.teachers": ["distill.teachers=[another/teacher]"],
    "distill.teacher_weights": ["distill.teachers=[another/teacher]", "distill.teacher_weights=[1,3]"],
    "distill.mode": ["distill.mode=seqkd"], "distill.prompts": ["distill.prompts=prompts.jsonl"],
    "distill.verifier": ["distill.verifier=exact"], "distill.parallel": ["distill.parallel=fsdp"],
    "export.gguf": ["export.gguf=F32"], "export.onnx": ["export.onnx=fp32"],
    "export.layout": ["export.onnx=fp32", "export.layout=transformers.js"],
    "quantize.gguf": ["quantize.gguf=[Q8_0]"], "quantize.onnx": ["export.onnx=fp32", "quantize.onnx=[int8]"],
    "quantize.onnx_block": ["export.onnx=fp32", "quantize.onnx=[int4]", "quantize.onnx_block=16"],
    "quantize.bnb": ["quantize.bnb=[int8]"], "eval.tasks": ["eval.tasks=[copa]"], "eval.ood": ["eval.ood=none"],
    "eval.include_path": ["eval.include_path=tasks/"], "eval.task_data": ["eval.task_data=task-data/"],
    "device.name": ["device.name=another"],
    "qad.types": ["qad.types=[Q4_0]"], "qad.of": ["qad.of=[teacher]"],
}


def changes(key: str, value) -> list[str]:
    """key=value arguments that change `key` (and what it needs) from its current value."""
    if key in SPECIAL:
        return SPECIAL[key]
    if isinstance(value, bool):
        return [f"{key}={str(not value).lower()}"]
    if isinstance(value, int):
        return [f"{key}={value + 1}"]
    if isinstance(value, float):
        return [f"{key}={value / 2}"]
    if value is None:
        return [f"{key}=1"]
    raise AssertionError(f"add how to change {key}={value!r} to SPECIAL")


def expected_redo(steps, keys: set, run_dir) -> set:
    """Steps that must be redone: they read a changed key, are new, are now made from other parents
    (e.g. quantize.imatrix=false drops the importance matrix), or depend on one that is redone."""
    redo = set()
    for s in steps:   # pipeline order: parents come first
        meta = run_dir / s.name / artifacts.META
        made_from = [p["name"] for p in json.loads(meta.read_text())["parents"]] if meta.is_file() else None
        reads = any(key == k or key.startswith(k + ".") for k in s.keys for key in keys)
        if reads or made_from != s.parents or any(p in redo for p in s.parents):
            redo.add(s.name)
    return redo


def value_of(cfg, key: str):
    section, _, leaf = key.partition(".")
    return getattr(getattr(cfg, section), leaf) if leaf else getattr(cfg, key)


def check_every_key(base: list, run_dir) -> int:
    """Change each config key in turn; the runner must redo exactly its readers and their dependents."""
    cfg = load_config(base)
    assert not [s.name for s in plan(cfg) if s.redo], "the unchanged config must reuse everything"
    checked = 0
    for key in all_keys:
        if key in CONTROLS:
            continue
        args = [a for a in changes(key, value_of(cfg, key)) if a not in base]
        changed = {a.split("=", 1)[0].replace("student", "student.model") if a.startswith("student=")
                   else a.split("=", 1)[0] for a in args}
        try:
            new_cfg = load_config(base + args)
        except UserError:
            continue   # not a valid change of this base run (e.g. quantize.gguf without a GGUF export)
        if not args or all(value_of(new_cfg, k) == value_of(cfg, k) for k in changed):
            continue   # the base run already has this value
        steps = plan(new_cfg)
        assert {s.name for s in steps if s.redo} == expected_redo(steps, changed, run_dir), key
        checked += 1
    return checked


def test_changes_cover_every_key():
    cfg = load_config([])
    for key in all_keys:
        if key not in CONTROLS:
            load_config(changes(key, value_of(cfg, key)))   # a valid config
