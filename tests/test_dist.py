"""Data-parallel distillation under torchrun: 2 CPU processes (gloo), DDP or FSDP, end with the same
student as one process on the same global batch; only rank 0 writes; an FSDP run resumes from its
gathered checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from compress import artifacts
from compress.models import load_model
from test_distill import prepare_run

SCRIPT = r"""
import os, sys
from pathlib import Path
from compress import artifacts
from compress.config import load_config
from compress.distill import dist, train
run_dir, crash = Path(sys.argv[1]), "crash" in sys.argv[3:]
cfg = load_config([f"out={run_dir.parent}", f"name={run_dir.name}", "distill.tokens=512", "distill.batch=4",
                   "distill.seq_len=32", "distill.checkpoint_every=2", "distill.lr=1e-3", "distill.chunk=50",
                   f"distill.parallel={sys.argv[2]}", *[a for a in sys.argv[3:] if a != "crash"]])
if crash:   # every rank dies right after the first checkpoint is on disk
    save = train.save_checkpoint
    def save_then_die(*args, **kw):
        save(*args, **kw)
        dist.barrier()
        os._exit(3)
    train.save_checkpoint = save_then_die
student, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
art = train.run(cfg, student, run_dir / "distilled", teacher=teacher, data=data)
m = art.meta["metrics"]
# one write(2) per rank: both ranks share the pipe, and print's separate writes can interleave
os.write(1, f"DONE {m['world_size']} {m['final_loss']} {m['resumed_from_step']} {m.get('params_on_rank0')}\n".encode())
"""


def launch(run_dir: Path, nproc: int, parallel: str = "ddp", crash: bool = False, extra: tuple = ()) -> str:
    script = run_dir.parent / "dist_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable])
    proc = subprocess.run([*cmd, str(script), str(run_dir), parallel, *extra] + (["crash"] if crash else []),
                          capture_output=True, text=True, env=env, timeout=300)
    assert (proc.returncode != 0) == crash, proc.stderr[-3000:]
    return proc.stdout


def same_weights(a, b) -> None:
    ma, mb = load_model(str(a.path)), load_model(str(b.path))
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.allclose(p, q, atol=1e-4), n


def test_two_gloo_ranks_match_one_process(tmp_path, tokenizer, tiny_data):
    one = prepare_run(tmp_path, tokenizer, tiny_data, "one")
    two = prepare_run(tmp_path, tokenizer, tiny_data, "two")
    assert "DONE 1" in launch(one, 1)
    out = launch(two, 2)
    assert out.count("DONE 2") == 2                                   # both ranks return the artifact
    a, b = artifacts.load(one / "distilled"), artifacts.load(two / "distilled")
    assert b.meta["metrics"]["world_size"] == 2
    assert abs(a.meta["metrics"]["final_loss"] - b.meta["metrics"]["final_loss"]) < 1e-3
    same_weights(a, b)
    assert not (two / "checkpoints").exists()


def test_fsdp_shards_the_student_matches_one_process_and_resumes(tmp_path, tokenizer, tiny_data):
    one = prepare_run(tmp_path, tokenizer, tiny_data, "one")
    fsdp = prepare_run(tmp_path, tokenizer, tiny_data, "fsdp")
    ckpt = ("distill.activation_checkpointing=true",)                  # recomputation inside FSDP units
    launch(one, 1, extra=ckpt)
    launch(fsdp, 2, "fsdp", crash=True, extra=ckpt)                    # killed after the step-2 checkpoint
    assert (next((fsdp / "checkpoints").iterdir()) / "checkpoint.pt").is_file()
    assert not (fsdp / "distilled").exists()
    out = launch(fsdp, 2, "fsdp", extra=ckpt)
    assert out.count("DONE 2") == 2
    a, b = artifacts.load(one / "distilled"), artifacts.load(fsdp / "distilled")
    m = b.meta["metrics"]
    assert m["resumed_from_step"] == 2 and m["parallel"] == "fsdp"
    assert m["params_on_rank0"] < 0.6 * b.meta["params"]               # each rank held about half
    assert abs(a.meta["metrics"]["final_loss"] - m["final_loss"]) < 1e-3
    same_weights(a, b)
