"""Student derivation and the distill loop on tiny models: learning, checkpoints, resume after kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from compress import artifacts
from compress.config import load_config
from compress.student.subset import block_influence, even_layers, keep_layers
from compress.models import load_model
from conftest import make_tiny, save_hf_artifact


def test_even_layers():
    assert even_layers(30, 2) == [0, 29]
    assert even_layers(10, 4) == [0, 3, 6, 9]
    assert even_layers(5, 5) == [0, 1, 2, 3, 4]


def test_keep_all_layers_reproduces_logits_and_dropping_changes_config(tokenizer):
    model = make_tiny(tokenizer, layers=3)
    ids = torch.randint(0, 1000, (1, 12))
    same = keep_layers(model, [0, 1, 2])
    assert torch.equal(model(ids).logits, same(ids).logits)
    small = keep_layers(model, [0, 2])
    assert small.config.num_hidden_layers == 2 and len(small.model.layers) == 2
    assert [l.self_attn.layer_idx for l in small.model.layers] == [0, 1]
    out = small.generate(ids, max_new_tokens=3, do_sample=False)    # the KV cache follows the new numbering
    assert out.shape == (1, 15)


def test_block_influence_finds_the_planted_identity_layer(tokenizer):
    model = make_tiny(tokenizer, layers=3)
    with torch.no_grad():   # layer 1 becomes (almost) the identity: its residual branches output ~0
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    scores = block_influence(model, torch.randint(0, 1000, (2, 16)))
    assert min(range(3), key=lambda i: scores[i]) == 1


DISTILL_SCRIPT = r"""
import sys
from pathlib import Path
from compress import artifacts
from compress.config import load_config
from compress.distill import train
run_dir, steps, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
cfg = load_config([f"out={run_dir.parent}", f"name={run_dir.name}", f"distill.tokens={steps * 2 * 32}",
                   "distill.batch=2", "distill.seq_len=32", f"distill.checkpoint_every={every}", "distill.lr=1e-3"])
student, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
art = train.run(cfg, student, run_dir / "distilled", teacher=teacher, data=data)
print("DONE", art.meta["metrics"]["resumed_from_step"], art.meta["metrics"]["final_loss"])
"""


def prepare_run(tmp_path, tokenizer, tiny_data, name):
    run_dir = tmp_path / name
    teacher = make_tiny(tokenizer, layers=2, seed=1)
    save_hf_artifact(teacher, tokenizer, run_dir / "teacher", stage="teacher")
    save_hf_artifact(keep_layers(teacher, [0]), tokenizer, run_dir / "student")
    artifacts.writing  # data: reuse the fixture's files
    import shutil
    shutil.copytree(tiny_data.path, run_dir / "data")
    return run_dir


def run_distill(run_dir, steps, every, wait=True):
    script = run_dir.parent / "distill_script.py"
    script.write_text(DISTILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), str(steps), str(every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if wait:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        return out
    return proc


def test_distill_learns_and_resumes_after_sigkill(tmp_path, tokenizer, tiny_data):
    steps, every = 12, 3
    # uninterrupted reference run
    ref_dir = prepare_run(tmp_path, tokenizer, tiny_data, "ref")
    out = run_distill(ref_dir, steps, every)
    assert "DONE 0" in out
    ref = artifacts.load(ref_dir / "distilled")
    curve = ref.meta["metrics"]["loss_curve"]
    assert curve[-1] < curve[0], curve                       # it learns

    # killed run: SIGKILL once a checkpoint exists, then re-run
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "killed")
    proc = run_distill(run_dir, steps, every, wait=False)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 300
    while not list(ckpts.glob("*/checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; raise steps"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "distilled").exists()             # nothing looks finished
    out = run_distill(run_dir, steps, every)
    resumed = int(out.split("DONE ")[1].split()[0])
    assert resumed > 0 and resumed % every == 0
    assert not list(ckpts.glob("*/checkpoint.pt"))          # cleaned after success

    # same metrics and weights as the uninterrupted run (CPU, fixed seeds)
    got = artifacts.load(run_dir / "distilled")
    assert got.meta["metrics"]["final_loss"] == pytest.approx(ref.meta["metrics"]["final_loss"], abs=1e-4)
    a, b = load_model(str(ref.path)), load_model(str(got.path))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_seq_len_above_positions_is_rejected(tmp_path, tokenizer, tiny_data):
    from compress.distill import train
    from compress.errors import UserError
    run_dir = prepare_run(tmp_path, tokenizer, tiny_data, "long")
    cfg = load_config([f"out={tmp_path}", "name=long", "distill.seq_len=4096", "distill.tokens=100"])
    with pytest.raises(UserError, match="positions"):
        train.run(cfg, artifacts.load(run_dir / "student"), run_dir / "distilled",
                  teacher=artifacts.load(run_dir / "teacher"), data=artifacts.load(run_dir / "data"))
    assert not (run_dir / "distilled").exists()
