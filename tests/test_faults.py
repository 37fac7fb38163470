"""Crashes never lose finished work or leave a half-written artifact that looks finished.

SIGKILL lands in export, quantize and evaluate of a real `compress run` on tiny models (distill is
covered in test_distill.py); every re-run resumes from the finished stages, and the final metrics
equal those of an uninterrupted run (CPU, fixed seeds). Also: a non-finite loss stops training and
keeps the last good checkpoint; a finished file truncated later is redone, not reused; memory
stays flat over many training steps; nothing loads model code or pickles implicitly.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from compress import artifacts
from compress.config import load_config
from compress.errors import UserError
from compress.models import save_hf
from conftest import SHARED, make_tiny, save_hf_artifact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory, tokenizer):
    """A 2-layer teacher dir and a text file: the whole pipeline runs in seconds on them."""
    base = tmp_path_factory.mktemp("faults")
    save_hf(make_tiny(tokenizer, layers=2, seed=3), tokenizer, base / "teacher")
    src = SHARED / "tiny_shakespeare" / "input.txt"
    text = src.read_text()[:60_000] if src.is_file() else "\n\n".join(
        f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * 10 for i in range(60))
    (base / "data.txt").write_text(text)
    return base


def run_args(base: Path, name: str) -> list[str]:
    return ["run", f"name={name}", f"teacher={base / 'teacher'}", f"data={base / 'data.txt'}",
            "student.layers=1", "distill.tokens=256", "distill.seq_len=32", "distill.batch=2",
            "distill.checkpoint_every=2", "quantize.gguf=[Q8_0]", "quantize.imatrix_tokens=256",
            "quantize.teacher=false", "eval.seqs=2", "eval.seq_len=32", "eval.prefill_tokens=16",
            "eval.decode_tokens=4", "eval.threads=1", "eval.memory=false", "samples.prompts=0"]


def start(base: Path, name: str, log: str) -> subprocess.Popen:
    # one torch thread: steady speed when other processes hold a core
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(base / log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "compress", *run_args(base, name)], cwd=base, env=env,
                                stdout=subprocess.DEVNULL, stderr=f, text=True)


def finish(base: Path, name: str) -> str:
    proc = start(base, name, f"{name}-last.log")
    assert proc.wait(timeout=600) == 0, (base / f"{name}-last.log").read_text()[-3000:]
    return (base / f"{name}-last.log").read_text()


def kill_when_half_written(proc: subprocess.Popen, run: Path, out_name: str) -> None:
    """SIGKILL the moment `out_name`'s temporary directory exists: the stage is mid-write."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if list(run.glob(f".{out_name}.tmp-*")):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.001)
    pytest.fail(f"the run ended (rc={proc.poll()}) before {out_name} was being written")


def assert_nothing_half_written_looks_finished(run: Path) -> None:
    """Every visible directory is a finished artifact whose main file is complete."""
    for d in run.iterdir():
        if d.is_dir() and not d.name.startswith(".") and d.name != "checkpoints":
            art = artifacts.load(d)            # UserError: a visible directory without meta.json
            if art.meta.get("file", ".") != ".":
                assert art.file.stat().st_size == art.meta["size_bytes"], d


def test_sigkill_in_export_quantize_evaluate_then_rerun_matches_uninterrupted(tiny_inputs):
    base = tiny_inputs
    run = base / "runs" / "killed"
    ref_proc = start(base, "ref", "ref.log")     # the uninterrupted run, alongside (one thread each)
    for out_name, done, unfinished in (("gguf-F16", "distilled", "gguf-F16"),
                                       ("gguf-Q8_0", "gguf-F16", "gguf-Q8_0"),
                                       ("eval-distilled", "eval-student", "eval-distilled")):
        kill_when_half_written(start(base, "killed", f"killed-in-{out_name}.log"), run, out_name)
        assert_nothing_half_written_looks_finished(run)
        assert (run / done / "meta.json").is_file() and not (run / unfinished).exists()

    log = finish(base, "killed")
    made = [l.split()[2] for l in log.splitlines() if l.startswith("▶")]
    assert made == ["eval-distilled", "eval-gguf-F16", "eval-gguf-Q8_0"], log[-3000:]
    assert not list(run.glob(".*tmp*")) and not (run / "checkpoints").exists()
    assert_nothing_half_written_looks_finished(run)

    assert ref_proc.wait(timeout=600) == 0, (base / "ref.log").read_text()[-3000:]
    ref = base / "runs" / "ref"
    evals = sorted(p.name for p in ref.glob("eval-*"))
    assert evals == sorted(p.name for p in run.glob("eval-*")) and len(evals) == 5
    for name in evals:
        want = artifacts.load(ref / name).meta["metrics"]["quality"]
        got = artifacts.load(run / name).meta["metrics"]["quality"]
        for key in ("ppl", "kld", "top1"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)


def test_finished_file_truncated_later_is_redone_not_reused(tmp_path):
    out = tmp_path / "gguf-X"
    with artifacts.writing(out, stage="export", config={}, parents=[], format="gguf", file="model.gguf") as (tmp, meta):
        (tmp / "model.gguf").write_bytes(b"x" * 1000)
    assert artifacts.find_done(out, artifacts.expected_hash("export", {}, [])) is not None
    (out / "model.gguf").write_bytes(b"x" * 500)
    assert artifacts.find_done(out, artifacts.expected_hash("export", {}, [])) is None


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tokenizer, tiny_data):
    """A teacher whose embedding row for one token is NaN: the first step that reads that token
    has a NaN loss; training stops there and the checkpoint from before it stays, all finite."""
    from compress.data import read_texts
    from compress.distill import train
    from compress.student.subset import keep_layers
    seq_len, batch, every, steps = 32, 2, 2, 8
    teacher = make_tiny(tokenizer, layers=2, tie=False, seed=1)
    run = tmp_path / "nan"
    student = save_hf_artifact(keep_layers(teacher, [0]), tokenizer, run / "student")
    seqs = train.pack(tokenizer, read_texts(tiny_data, "train"), seq_len)
    seen: set[int] = set()
    for step in range(steps):   # the first step after a checkpoint that reads a token no earlier step read
        rows = set(seqs[train.batch_rows(len(seqs), step, batch, 0)].flatten().tolist())
        if step >= every and rows - seen:
            bad_step, bad_token = step, min(rows - seen)
            break
        seen |= rows
    else:
        pytest.fail("no step introduces a new token")
    with torch.no_grad():
        teacher.model.embed_tokens.weight[bad_token] = float("nan")
    poisoned = save_hf_artifact(teacher, tokenizer, run / "teacher", stage="teacher")
    cfg = load_config([f"out={tmp_path}", "name=nan", f"distill.tokens={steps * batch * seq_len}",
                       f"distill.seq_len={seq_len}", f"distill.batch={batch}", f"distill.checkpoint_every={every}"])
    with pytest.raises(UserError, match=rf"loss became nan at step {bad_step} \(the last good checkpoint is kept") as e:
        train.run(cfg, student, run / "distilled", teacher=poisoned, data=tiny_data)
    assert "lower distill.lr" in str(e.value) and "\n" not in str(e.value)
    assert not (run / "distilled").exists()
    [ckpt] = (run / "checkpoints").glob("*/checkpoint.pt")
    assert str(ckpt.parent) in str(e.value)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["step"] == bad_step // every * every > 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_memory_stays_flat_over_many_training_steps(tmp_path):
    """Peak RSS of a 200-step run is within a few MB of a 20-step run's: nothing grows per step."""
    import psutil
    from transformers import LlamaConfig, LlamaForCausalLM
    from compress.config import Distill
    from compress.distill.train import train
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    teacher, student = LlamaForCausalLM(config), LlamaForCausalLM(config)
    seqs = torch.randint(0, 1024, (64, 32))                  # [rows, seq_len]
    d = Distill(batch=2, seq_len=32, lr=1e-3, checkpoint_every=10**6)
    me = psutil.Process()

    def peak_rss(steps: int) -> int:
        peak, stop = [me.memory_info().rss], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], me.memory_info().rss)
                time.sleep(0.002)
        t = threading.Thread(target=sample)
        t.start()
        try:
            stats, _ = train(student, [teacher], [1.0], seqs, d, steps, tmp_path / f"ckpt-{steps}", "cpu", vocab=1024)
        finally:
            stop.set()
            t.join()
        assert stats["final_loss"] is not None
        return peak[0]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny ops on 2 contended threads run many times slower
    try:
        peak_rss(5)                                          # first-use allocations
        p20, p200 = peak_rss(20), peak_rss(200)
    finally:
        torch.set_num_threads(threads)
    print(f"peak RSS 20 steps {p20 / 2**20:.1f} MB, 200 steps {p200 / 2**20:.1f} MB")
    assert p200 - p20 < 16 * 2**20, f"peak RSS grew {(p200 - p20) / 2**20:.1f} MB from 20 to 200 steps"


def test_no_implicit_code_or_pickle_loading():
    """trust_remote_code only from the user's flag; torch.load only with weights_only=True; no pickles."""
    for path in (ROOT / "compress").rglob("*.py"):
        text = path.read_text()
        assert "trust_remote_code=True" not in text, path
        assert "allow_pickle=True" not in text and "pickle.load" not in text, path
        for args in re.findall(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in args, path
        # user-given models (a `path` resolved from teacher=/student=) are loaded with the user's flag
        for call in re.findall(r"load_(?:model|tokenizer)\(path\b[^)]*\)", text):
            assert "trust_remote_code" in call, (path, call)
