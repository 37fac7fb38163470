"""A catalogue of bad inputs: each gives one line that says what was wrong and how to fix it,
exit code 2, and no artifact that looks finished.

CLI cases run `compress.cli.main` in-process (what `python -m compress` runs) and fail in the config
check or in preflight, before anything is written; two run as real subprocesses for the exit code,
the --debug traceback and a write that fails half-way (file-size limit, like a full disk). Stage
cases call one stage on tiny models and expect compress.errors.UserError.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compress import artifacts
from compress.cli import main
from compress.config import load_config
from compress.errors import UserError
from compress.models import save_hf
from conftest import make_tiny, save_data_artifact, save_hf_artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A plain HF directory (no meta.json) holding a tiny 2-layer Llama with 512 positions."""
    out = tmp_path_factory.mktemp("teacher") / "tiny"
    save_hf(make_tiny(tokenizer), tokenizer, out)
    return out


def model_dir(teacher_dir: Path, tmp: Path, name: str) -> Path:
    """A copy of the tiny teacher to damage."""
    return Path(shutil.copytree(teacher_dir, tmp / name))


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# Each setup(tmp, teacher_dir, request) prepares files and returns the `compress` arguments.
def truncated_safetensors(tmp, teacher, request):
    d = model_dir(teacher, tmp, "cut")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["run", f"teacher={d}"]


def garbage_safetensors(tmp, teacher, request):
    d = model_dir(teacher, tmp, "junk")
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    return ["run", f"teacher={d}"]


def pickle_only(tmp, teacher, request):
    d = model_dir(teacher, tmp, "pickled")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return ["run", f"teacher={d}"]


def custom_code(tmp, teacher, request):
    d = model_dir(teacher, tmp, "custom")
    edit_json(d / "tokenizer_config.json", auto_map={"AutoTokenizer": ["my_tok.MyTokenizer", None]})
    return ["run", f"teacher={d}"]


def unsupported_arch(tmp, teacher, request):
    d = tmp / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 2}))
    return ["run", f"teacher={d}"]


def corrupt_config(tmp, teacher, request):
    d = model_dir(teacher, tmp, "badcfg")
    (d / "config.json").write_text("{\"model_type\": \"llama\",")
    return ["run", f"teacher={d}"]


def truncated_gguf(tmp, teacher, request):
    src = request.getfixturevalue("teacher_gguf")
    with open(src, "rb") as f:
        (tmp / "cut.gguf").write_bytes(f.read(src.stat().st_size // 3))
    return ["run", f"teacher={tmp / 'cut.gguf'}"]


def text_as_gguf(tmp, teacher, request):
    (tmp / "notes.gguf").write_text("this is not a model\n" * 10)
    return ["run", f"teacher={tmp / 'notes.gguf'}"]


def huge_teacher(tmp, teacher, request):
    """Headers of a 100B-parameter model over a sparse file: real sizes, no real bytes."""
    d = model_dir(teacher, tmp, "huge")
    vocab, hidden = 1_000_000, 100_000
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F16", "shape": [vocab, hidden],
                                                       "data_offsets": [0, 2 * vocab * hidden]}}).encode()
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 2 * vocab * hidden)
    edit_json(d / "config.json", vocab_size=vocab, hidden_size=hidden)
    return ["run", f"teacher={d}"]


def data_file(content: str, name: str = "d.jsonl"):
    def setup(tmp, teacher, request):
        (tmp / name).write_text(content)
        return ["run", f"teacher={teacher}", f"data={tmp / name}"]
    return setup


def data_bytes(content: bytes, name: str):
    def setup(tmp, teacher, request):
        (tmp / name).write_bytes(content)
        return ["run", f"teacher={teacher}", f"data={tmp / name}"]
    return setup


def profile_file(content: str):
    def setup(tmp, teacher, request):
        (tmp / "p.yaml").write_text(content)
        return ["run", f"profile={tmp / 'p.yaml'}"]
    return setup


def out_is_a_file(tmp, teacher, request):
    (tmp / "afile").write_text("x")
    return ["run", f"teacher={teacher}", f"out={tmp / 'afile' / 'runs'}"]


def with_teacher(*args):
    return lambda tmp, teacher, request: ["run", f"teacher={teacher}", *args]


def args(*a):
    return lambda tmp, teacher, request: list(a)


CASES = [
    # configuration: keys, values, ranges, formats, names, profiles
    ("unknown-key", args("run", "techer=x"), "did you mean 'teacher'"),
    ("task-typo", args("run", "eval.tasks=[arc_eassy]"), "did you mean 'arc_easy'"),
    ("task-folder-missing", args("run", "eval.tasks=[mine]", "eval.include_path=no/such/dir"),
     "eval.include_path=no/such/dir is not a directory"),
    ("task-data-missing", args("run", "eval.tasks=[arc_easy]", "eval.task_data=no/such/dir"),
     "eval.task_data=no/such/dir is not a directory"),
    ("task-limit-zero", args("run", "eval.limit=0"), "eval.limit and eval.ood_seqs must be >= 1"),
    ("ood-file-missing", args("run", "eval.ood=no/such.txt"), "eval.ood=no/such.txt is not a file"),
    ("section-given-a-value", args("run", "distill=5"), "is a section"),
    ("key-conflict", args("run", "distill.tokens=5", "distill.tokens.x=1"), "conflicts"),
    ("wrong-type-float", args("run", "distill.lr=fast"), "wrong type"),
    ("wrong-type-bool", args("run", "force=maybe"), "wrong type"),
    ("list-for-int", args("run", "eval.threads=[1,2]"), "wrong type"),
    ("alpha-negative", args("run", "distill.alpha=-0.1"), "distill.alpha must be in [0, 1]"),
    ("alpha-end-above-1", args("run", "distill.alpha_end=2"), "distill.alpha must be in [0, 1]"),
    ("temperature-negative", args("run", "distill.temperature=-1"), "temperature must be > 0"),
    ("temperature-end-zero", args("run", "distill.temperature_end=0"), "temperature must be > 0"),
    ("lr-zero", args("run", "distill.lr=0"), "distill.lr=0.0 is out of range"),
    ("lr-negative", args("run", "distill.lr=-2e-4"), "is out of range"),
    ("seq-len-below-8", args("run", "distill.seq_len=4"), "distill.seq_len >= 8"),
    ("batch-zero", args("run", "distill.batch=0"), "distill.batch"),
    ("tokens-negative", args("run", "distill.tokens=-1"), "distill.tokens must be >= 0"),
    ("warmup-above-1", args("run", "distill.warmup=1.5"), "distill.warmup"),
    ("schedule-typo", args("run", "distill.schedule=cosin"), "did you mean 'cosine'"),
    ("loss-unknown-term", args("run", "distill.loss=fkl:0.9,cee:0.1"), "unknown term 'cee' (did you mean 'ce'?)"),
    ("loss-bad-weight", args("run", "distill.loss=fkl:lots"), "weight 'lots' of fkl is not a number"),
    ("loss-negative-weight", args("run", "distill.loss=fkl:-1"), "weights must be finite and >= 0"),
    ("loss-all-zero", args("run", "distill.loss=fkl:0,ce:0"), "no term with a positive weight"),
    ("loss-with-alpha", args("run", "distill.loss=rkl:1", "distill.alpha=0.5"), "give every weight in it"),
    ("beta-above-1", args("run", "distill.beta=2"), "distill.beta=2.0 must be in [0, 1]"),
    ("top-k-zero", args("run", "distill.top_k=0"), "distill.top_k=0 is out of range"),
    ("cache-k-too-large", args("run", "distill.teacher_cache=topk:5000", "distill.loss=topk:1"), "K=5000 is out of range"),
    ("cache-bad-spec", args("run", "distill.teacher_cache=top5"), "write topk:K"),
    ("cache-with-full-kl", args("run", "distill.teacher_cache=topk:8", "distill.loss=fkl:1"), "need the live teacher"),
    ("mode-typo", args("run", "distill.mode=seqdk"), "did you mean 'seqkd'"),
    ("verifier-typo", args("run", "distill.verifier=exakt"), "did you mean 'exact'"),
    ("seqkd-with-loss", args("run", "distill.mode=seqkd", "distill.loss=fkl:1"), "leave distill.loss"),
    ("lmbda-above-1", args("run", "distill.lmbda=1.5"), "distill.lmbda in [0, 1]"),
    ("parallel-typo", args("run", "distill.parallel=fsd"), "did you mean 'fsdp'"),
    ("fsdp-onpolicy", args("run", "distill.parallel=fsdp", "distill.mode=onpolicy"), "use distill.parallel=ddp"),
    ("teacher-weights-length", args("run", "distill.teachers=[a/b]", "distill.teacher_weights=[1]"), "must list 2"),
    ("select-typo", args("run", "student.select=importanc"), "did you mean 'importance'"),
    ("student-layers-zero", args("run", "student.layers=0"), "student.layers must be at least 1"),
    ("heldout-one", args("run", "gen.heldout=1"), "gen.heldout"),
    ("eval-seqs-zero", args("run", "eval.seqs=0"), "eval.seqs"),
    ("imatrix-tokens-zero", args("run", "quantize.imatrix_tokens=0"), "quantize.imatrix_tokens"),
    ("unknown-export-format", args("run", "export.gguf=F15"), "did you mean 'F16'"),
    ("quantized-export-format", args("run", "export.gguf=Q4_K_M"), "is a quantized type"),
    ("unquantized-in-quant-list", args("run", "quantize.gguf=[Q8_0,F16]"), "drop it from quantize.gguf"),
    ("unknown-stage", args("run", "stages=[export,quantise]"), "did you mean 'quantize'"),
    ("name-with-slash", args("run", "name=a/b"), "plain directory name"),
    ("name-with-backslash", args("run", "name=a\\b"), "plain directory name"),
    ("name-hidden", args("run", "name=.x"), "plain directory name"),
    ("profile-bad-yaml", profile_file("distill: [unclosed\n"), "is not valid YAML"),
    ("profile-not-a-mapping", profile_file("- phone\n- laptop\n"), "must be a mapping"),
    ("profile-unknown-key", profile_file("distill:\n  tokns: 5\n"), "did you mean 'distill.tokens'"),
    ("profile-inherits-unknown", profile_file("inherits: phnoe\n"), "did you mean 'phone'"),
    # commands
    ("unknown-listing", args("ls", "formatz"), "did you mean 'formats'"),
    ("report-without-run", args("report"), "usage: compress report"),
    ("compare-out-without-dir", args("compare", "runs/a", "--out"), "--out needs a directory"),
    # model files, checked from their headers before anything loads
    ("teacher-gguf-missing", args("run", "teacher=missing.gguf"), "teacher file missing.gguf does not exist"),
    ("teacher-not-a-model-dir", lambda tmp, t, r: (tmp / "empty").mkdir() or ["run", f"teacher={tmp / 'empty'}"],
     "is not an HF model directory"),
    ("teacher-unsupported-arch", unsupported_arch, "unsupported architecture 'bert'"),
    ("teacher-config-corrupt", corrupt_config, "config.json is unreadable"),
    ("teacher-unknown-builtin", args("run", "teacher=builtin:gpt5"), "unknown built-in teacher"),
    ("teacher-pickle-weights-only", pickle_only, "pickle files"),
    ("teacher-truncated-safetensors", truncated_safetensors, "is truncated or corrupt"),
    ("teacher-garbage-safetensors", garbage_safetensors, "not a valid safetensors file"),
    ("teacher-truncated-gguf", truncated_gguf, "is not a valid GGUF file"),
    ("teacher-text-named-gguf", text_as_gguf, "is not a valid GGUF file"),
    ("custom-code-without-trust", custom_code, "trust_remote_code=true"),
    ("student-missing", with_teacher("student=no/such/dir/here"), "student no/such/dir/here does not exist"),
    ("student-layers-above-teacher", with_teacher("student.layers=5"), "more than the teacher's 2 layers"),
    ("distill-seq-len-above-positions", with_teacher("distill.seq_len=1024"), "above the teacher's 512 positions"),
    ("eval-seq-len-above-positions", with_teacher("eval.seq_len=600"), "eval.seq_len<=512"),
    ("teacher-too-big-for-host", huge_teacher, "does not fit this machine (RAM needs"),
    # data files
    ("data-missing", with_teacher("data=missing.jsonl"), "data file missing.jsonl does not exist"),
    ("data-empty-txt", data_file("\n\n  \n", "d.txt"), "holds no text"),
    ("data-bad-jsonl-line", data_file('{"text": "ok"}\n{"text": broken\n'), ":2 is not valid JSON"),
    ("data-row-not-object", data_file('["a", "b"]\n'), "must be a JSON object"),
    ("data-row-unknown-keys", data_file('{"content": "hi"}\n'), "each row needs 'text'"),
    ("data-all-blank-rows", data_file('{"text": "  "}\n{"text": ""}\n'), "holds no text"),
    ("data-jsonl-latin1", data_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin1"), "d.jsonl"),
     "d.jsonl is not UTF-8: byte 0xe9 at offset 28 (line 2) is invalid; convert it, e.g. iconv"),
    ("data-txt-cp1252", data_bytes(b"A paragraph.\n\n\x93quoted\x94 text\n", "d.txt"),
     "d.txt is not UTF-8: byte 0x93 at offset 14 (line 3)"),
    ("ood-txt-latin1", lambda tmp, t, r: (tmp / "o.txt").write_bytes(b"caf\xe9\n") and
     ["run", f"teacher={t}", f"eval.ood={tmp / 'o.txt'}"], "o.txt is not UTF-8: byte 0xe9 at offset 3"),
    # output
    ("out-is-a-file", out_is_a_file, "is a file, not a directory"),
]


@pytest.mark.parametrize("setup,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(setup, needle, tmp_path, teacher_dir, request,
                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = setup(tmp_path, teacher_dir, request)
    if argv[0] == "run":
        argv.insert(1, "name=bad")   # first, so that a case's own name= wins
    before = set(tmp_path.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert "Traceback" not in err
    assert set(tmp_path.rglob("*")) == before            # nothing written, not even the run dir


def test_read_only_output_dir(tmp_path, teacher_dir, monkeypatch, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits; out-is-a-file covers the unwritable case")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["run", f"teacher={teacher_dir}", f"out={ro}", "name=x"]) == 2
    finally:
        ro.chmod(0o755)
    err = capsys.readouterr().err.strip()
    assert "cannot write to" in err and "out=<a writable directory>" in err and "\n" not in err
    assert not list(ro.iterdir())


def compress_proc(*argv, cwd, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "compress", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, **kw)


def test_traceback_only_with_debug(tmp_path):
    proc = compress_proc("run", "distill.alpha=7", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = compress_proc("run", "distill.alpha=7", "--debug", cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr


def test_disk_full_mid_write_keeps_nothing_half_written(tmp_path, teacher_dir):
    """A file-size limit makes the first large write fail with EFBIG, as a full disk would (ENOSPC)."""
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # get the error instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    proc = compress_proc("run", f"teacher={teacher_dir}", "name=full", cwd=tmp_path, preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "File too large" in errors[0] and "re-run" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    run = tmp_path / "runs" / "full"
    assert not list(run.glob("*/meta.json")) and not list(run.glob(".*tmp*"))


# ---------------------------------------------------------------- stage-level bad input

@pytest.fixture()
def teacher_art(tokenizer, tmp_path):
    return save_hf_artifact(make_tiny(tokenizer, layers=2), tokenizer, tmp_path / "run" / "teacher", stage="teacher")


def test_student_with_another_tokenizer(tmp_path, tokenizer, teacher_art, tiny_data):
    from compress.student import subset as student
    from compress.models import load_tokenizer
    other = load_tokenizer(str(teacher_art.path))
    other.add_tokens(["<not-in-the-teacher>"])
    d = tmp_path / "other-student"
    save_hf(make_tiny(other, layers=1), other, d)
    cfg = load_config([f"student={d}", f"out={tmp_path}", "name=run"])
    with pytest.raises(UserError, match="does not share the teacher's tokenizer.*distill.mode=seqkd"):
        student.run(cfg, teacher_art, tmp_path / "run" / "student", data=tiny_data)
    assert not (tmp_path / "run" / "student").exists()
    # sequence-level KD trains on text, so the student stage accepts it; logit distillation refuses it
    seq = load_config([f"student={d}", f"out={tmp_path}", "name=run", "distill.mode=seqkd"])
    art = student.run(seq, teacher_art, tmp_path / "run" / "student", data=tiny_data)
    from compress.distill import train
    logits = load_config([f"out={tmp_path}", "name=run", "distill.tokens=64", "distill.seq_len=32", "distill.batch=2"])
    with pytest.raises(UserError, match="different tokenizers.*distill.mode=seqkd"):
        train.run(logits, art, tmp_path / "run" / "distilled", teacher=teacher_art, data=tiny_data)
    assert not (tmp_path / "run" / "distilled").exists()


def test_generated_data_all_filtered(tmp_path, teacher_art, monkeypatch):
    """Every teacher answer is rejected (repetitive): the data stage says so instead of training on nothing."""
    from compress import data
    monkeypatch.setenv("COMPRESS_CACHE", str(tmp_path / "cache"))
    cfg = load_config([f"out={tmp_path}", "name=run", "gen.prompts=4"])
    cache = data.generated_cache(teacher_art, cfg)
    cache.parent.mkdir(parents=True)
    data.write_jsonl(cache, [{"prompt": f"p{i}", "response": "la " * 50, "finished": True} for i in range(4)])
    with pytest.raises(UserError, match="0 usable examples after filtering"):
        data.run(cfg, teacher_art, tmp_path / "run" / "data")
    assert not (tmp_path / "run" / "data").exists()


def test_user_data_with_one_example(tmp_path, teacher_art):
    from compress import data
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "a single example"}) + "\n")
    cfg = load_config([f"out={tmp_path}", "name=run", f"data={tmp_path / 'one.jsonl'}"])
    with pytest.raises(UserError, match="need at least 2"):
        data.run(cfg, teacher_art, tmp_path / "run" / "data")
    assert not (tmp_path / "run" / "data").exists()


@pytest.fixture(scope="module")
def truncated_f16(tokenizer, tmp_path_factory):
    """A finished F16 artifact whose model.gguf lost its second half afterwards."""
    from compress.export import gguf as export_gguf
    base = tmp_path_factory.mktemp("cut")
    teacher = save_hf_artifact(make_tiny(tokenizer, layers=2), tokenizer, base / "run" / "teacher", stage="teacher")
    cfg = load_config([f"out={base}", "name=run"])
    art = export_gguf.run(cfg, teacher, base / "run" / "gguf-F16")
    data = art.file.read_bytes()
    art.file.write_bytes(data[: len(data) // 2])
    return art


def test_truncated_gguf_in_the_evaluate_runtime(truncated_f16):
    from compress.evaluate.runtimes import open_runtime
    with pytest.raises(UserError, match="llama.cpp cannot load .*truncated or corrupt"):
        open_runtime(truncated_f16, threads=1)


def test_truncated_gguf_given_to_quantize(truncated_f16, tmp_path):
    from compress.quantize import gguf as quantize_gguf
    cfg = load_config([f"out={tmp_path}", "name=run"])
    with pytest.raises(UserError, match="could not quantize"):
        quantize_gguf.run(cfg, truncated_f16, tmp_path / "run" / "gguf-Q8_0", qtype="Q8_0")
    assert not (tmp_path / "run" / "gguf-Q8_0").exists()


def test_corrupt_safetensors_in_an_artifact(teacher_art, tmp_path):
    from compress.export import gguf as export_gguf
    f = teacher_art.path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    cfg = load_config([f"out={tmp_path}", "name=run"])
    with pytest.raises(UserError, match="truncated or corrupt"):
        export_gguf.run(cfg, teacher_art, tmp_path / "run" / "gguf-F16")
    assert not (tmp_path / "run" / "gguf-F16").exists()


def test_pickle_weights_are_never_unpickled(tmp_path, teacher_dir):
    """A pickle that would run code when loaded sits where the weights should be: refused, never run."""
    import pickle
    from compress.models import load_model
    d = model_dir(teacher_dir, tmp_path, "evil")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(UserError, match="pickle files"):
        load_model(str(d))
    assert not marker.exists()


def test_tampered_meta_cannot_point_outside_the_artifact(tmp_path):
    art = save_data_artifact(["a b c"], ["d e f"], tmp_path / "data")
    edit_json(art.path / "meta.json", file="../../etc/passwd")
    with pytest.raises(UserError, match="outside its directory"):
        artifacts.load(art.path)


def test_unreadable_checkpoint(tmp_path, tokenizer, tiny_data):
    from compress.distill import train
    from test_distill import prepare_run
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "ck")
    cfg = load_config([f"out={tmp_path}", "name=ck", "distill.tokens=256", "distill.seq_len=32", "distill.batch=2"])
    src, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
    h = train.run.stage.identity(cfg, src, teacher=teacher, data=data).hash
    ckpt = run_dir / "checkpoints" / f"distilled-{h}" / "checkpoint.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 half a zip")
    with pytest.raises(UserError, match="unreadable.*delete it"):
        train.run(cfg, src, run_dir / "distilled", teacher=teacher, data=data)
    assert not (run_dir / "distilled").exists()


# ---------------------------------------------------------------- the preflight estimate (pure)

SMOL = {"params": 134_515_008, "embed": 28_311_552, "layers": 30, "vocab": 49152, "gguf": True}


def knobs(**over):
    from compress.preflight import knobs_of
    return {**knobs_of(load_config(["name=x"])), **over}


def test_fsdp_batch_not_divisible_by_ranks_is_one_line_before_any_stage(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")                  # as torchrun --nproc_per_node=3 sets it
    with pytest.raises(UserError, match=r"distill.batch \(4\) divisible by the 3 processes.*distill.batch=3"):
        load_config(["distill.parallel=fsdp", "distill.batch=4"])
    load_config(["distill.parallel=ddp", "distill.batch=4"])   # DDP takes uneven shares


def test_estimate_adds_up_what_the_stages_hold_and_write():
    from compress.formats import GGUF_QUANT
    from compress.preflight import LOGIT_COPIES, MB, OVERHEAD_MB, estimate
    k = knobs(student_layers=15, batch=4, grad_accum=2, seq_len=256, quants=["Q8_0", "Q4_0"],
              teacher_quants=False, eval_seqs=16, eval_seq_len=128, tokens=1000)
    P, E = SMOL["params"], SMOL["embed"]
    S = E + (P - E) / 2
    need = estimate(SMOL, k)
    logits = LOGIT_COPIES * min(2 * 256, k["chunk"]) * 49152 * 4   # the loss runs chunk by chunk
    assert need["ram_mb"] == pytest.approx(OVERHEAD_MB + max(8 * P, 4 * P + 16 * S + logits) / MB)
    files = 4 * P + 8 * S + 12 * S + S * (16 + GGUF_QUANT["Q8_0"].bits + GGUF_QUANT["Q4_0"].bits) / 8 + 16 * 128 * 49152 * 2
    assert need["disk_mb"] == pytest.approx(files / MB) and need["vram_mb"] == 0
    # no distillation: no optimizer, no checkpoint; quantizing the teacher adds its GGUFs
    assert estimate(SMOL, {**k, "tokens": 0})["disk_mb"] == pytest.approx((files - 12 * S) / MB)
    assert estimate(SMOL, {**k, "teacher_quants": True})["disk_mb"] > need["disk_mb"] + 2 * P / MB
    on_gpu = estimate(SMOL, {**k, "device": "cuda"})
    assert on_gpu["vram_mb"] == pytest.approx((4 * P + 16 * S + logits) / MB) and on_gpu["ram_mb"] < need["ram_mb"]
    # torchrun: two ranks on this host each hold their own; FSDP over 4 ranks splits the student's state
    two = estimate(SMOL, {**k, "ranks": 2})
    assert two["ram_mb"] == pytest.approx(OVERHEAD_MB + 2 * (4 * P + 16 * S + logits) / MB)
    fsdp = estimate(SMOL, {**k, "device": "cuda", "ranks": 4, "shards": 4})
    assert fsdp["vram_mb"] == pytest.approx((4 * P + 4 * S + logits) / MB)
    assert fsdp["ram_mb"] == pytest.approx(OVERHEAD_MB + max(8 * P, 4 * (4 * P + 4 * S)) / MB)


def test_suggestion_fits_and_targets_the_short_resource():
    from compress.preflight import estimate, shortfalls, suggest
    k = knobs(student_layers=20, batch=8, grad_accum=1, seq_len=512, tokens=10_000, teacher_quants=True)
    need = estimate(SMOL, k)
    tight_ram = {"ram_mb": need["ram_mb"] * 0.8, "disk_mb": need["disk_mb"] * 2, "vram_mb": None}
    fix = suggest(SMOL, k, tight_ram)
    assert fix and fix[0] == "distill.grad_accum=8" and not any(f.startswith("quantize") for f in fix)
    tight_disk = {"ram_mb": need["ram_mb"] * 2, "disk_mb": need["disk_mb"] * 0.9, "vram_mb": None}
    assert suggest(SMOL, k, tight_disk) == ["quantize.teacher=false"]
    assert shortfalls(need, tight_disk) == [f"disk needs ~{need['disk_mb']:.0f} MB, {tight_disk['disk_mb']:.0f} MB free"]
    assert suggest(SMOL, k, {"ram_mb": 100, "disk_mb": 100, "vram_mb": None}) is None
