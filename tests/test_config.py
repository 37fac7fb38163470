"""Configuration: shipped profiles load, keys merge, bad input names the fix."""
import pytest

from compress.cli import main
from compress.config import list_profiles, load_config, parse_overrides
from compress.errors import UserError


@pytest.mark.parametrize("name", list_profiles())
def test_every_shipped_profile_loads(name):
    cfg = load_config([f"profile={name}", "name=x"])
    assert cfg.profile == name and cfg.device.threads >= 1
    q = cfg.quantize
    assert (q.gguf or q.onnx or q.bnb) and cfg.budgets.max_size_mb


def test_required_profiles_ship():
    assert {"phone", "laptop", "raspberry-pi", "browser", "server-gpu"} <= set(list_profiles())


def test_overrides_win_over_profile_and_lists_parse():
    cfg = load_config(["profile=phone", "student.layers=12", "quantize.gguf=[Q8_0,Q4_K_M]",
                       "distill.tokens=1000", "eval.threads=1", "teacher=some/model", "data=x.jsonl"])
    assert cfg.student.layers == 12 and cfg.quantize.gguf == ["Q8_0", "Q4_K_M"]
    assert cfg.distill.tokens == 1000 and cfg.eval.threads == 1
    assert cfg.teacher == "some/model" and cfg.data == "x.jsonl"
    assert cfg.name.startswith("phone-")


def test_student_shorthand_and_scalar_list():
    assert parse_overrides(["student=dir"]) == {"student": {"model": "dir"}}
    assert load_config(["quantize.gguf=Q4_0"]).quantize.gguf == ["Q4_0"]


def test_profile_from_path_with_inherits(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("inherits: phone\nbudgets:\n  max_size_mb: 42\n")
    cfg = load_config([f"profile={p}"])
    assert cfg.budgets.max_size_mb == 42 and cfg.device.threads == 4


@pytest.mark.parametrize("args,needle", [
    (["profile=phon"], "did you mean 'phone'"),
    (["distill.tokns=5"], "did you mean 'distill.tokens'"),
    (["studnt.layers=5"], "did you mean 'student'"),
    (["quantize.gguf=[Q4_K_X]"], "did you mean"),
    (["distill.alpha=1.5"], "distill.alpha"),
    (["distill.temperature=0"], "temperature"),
    (["distill.lr=5"], "distill.lr"),
    (["name=../evil"], "plain directory name"),
    (["student.layers=abc"], "wrong type"),
    (["profile=missing.yaml"], "does not exist"),
    (["stages=[distil]"], "did you mean 'distill'"),
    (["noequals"], "key=value"),
])
def test_bad_config_is_one_clear_error(args, needle):
    with pytest.raises(UserError) as e:
        load_config(args)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_bad_input_exits_2_with_one_line(capsys):
    assert main(["run", "profile=phon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean 'phone'" in err
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_cli_ls(capsys):
    assert main(["ls", "profiles"]) == 0
    out = capsys.readouterr().out
    assert "phone" in out and "raspberry-pi" in out
    assert main(["ls", "formats"]) == 0
    assert "Q4_K_M" in capsys.readouterr().out
    assert main(["ls", "keys"]) == 0
    assert "distill.tokens" in capsys.readouterr().out


def test_profiles_are_found_outside_the_checkout(tmp_path):
    """After `pip install .` the profiles ship as package data (run from another directory)."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "compress", "ls", "profiles"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "phone" in proc.stdout, proc.stderr


def test_every_subpackage_is_declared_for_installation():
    """A package missing from pyproject's list imports in a checkout but not after `pip install .`."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    declared = set(re.findall(r'"(compress[\w.]*)"', (root / "pyproject.toml").read_text()))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "compress").rglob("__init__.py")}
    assert found <= declared, found - declared


def test_readme_key_table_is_generated_from_the_config():
    """README's "Configuration keys" section holds exactly keys_markdown(); regenerate it with
    python -c "from compress.config import keys_markdown; print(keys_markdown())"."""
    from pathlib import Path
    from compress.config import keys_markdown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Configuration keys\n", 1)[1].split("\n## ", 1)[0]
    assert keys_markdown() in section, "README's key table differs from compress.config: regenerate it"


def test_every_key_has_help_and_its_limits_read_well():
    from compress.config import RunConfig
    from compress.keys import rows, walk
    for key, f in walk(RunConfig):
        assert f.metadata.get("help", "").strip(), f"{key} has no help text: declare it with key(default, help)"
    listed = {k: v for k, _, v, _ in rows(RunConfig)}
    assert listed["distill.lr"] == "in (0, 1)" and listed["distill.seq_len"] == ">= 8"
    assert listed["distill.warmup"] == "in [0, 1)" and listed["quantize.bnb"] == "any of int8, nf4"


def test_limits_come_from_the_fields():
    """A choice or range declared on a field is checked with no hand-written code for it."""
    from compress.config import RunConfig
    from compress.keys import check_key, walk
    fields = dict(walk(RunConfig))
    with pytest.raises(UserError, match=r"depth_metric='los' \(did you mean 'loss'\?\); it takes block_influence, loss"):
        check_key("prune.depth_metric", fields["prune.depth_metric"], "los")
    with pytest.raises(UserError, match=r"distill.chunk=0 is out of range; distill.chunk must be >= 1"):
        check_key("distill.chunk", fields["distill.chunk"], 0)
    check_key("distill.chunk", fields["distill.chunk"], None)   # unset keys are not checked
    check_key("quantize.onnx", fields["quantize.onnx"], ["int8", "int4"])
