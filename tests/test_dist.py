"""Data-parallel distillation under torchrun: 2 CPU processes (gloo) end with the same student as
one process on the same global batch, and only rank 0 writes."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from compress import artifacts
from compress.models import load_model
from test_distill import prepare_run

SCRIPT = r"""
import sys
from pathlib import Path
from compress import artifacts
from compress.config import load_config
from compress.distill import train
run_dir = Path(sys.argv[1])
cfg = load_config([f"out={run_dir.parent}", f"name={run_dir.name}", "distill.tokens=512", "distill.batch=4",
                   "distill.seq_len=32", "distill.checkpoint_every=2", "distill.lr=1e-3", "distill.chunk=50"])
student, teacher, data = (artifacts.load(run_dir / n) for n in ("student", "teacher", "data"))
art = train.run(cfg, student, run_dir / "distilled", teacher=teacher, data=data)
print("DONE", art.meta["metrics"]["world_size"], art.meta["metrics"]["final_loss"])
"""


def launch(run_dir: Path, nproc: int) -> str:
    script = run_dir.parent / "dist_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
           if nproc > 1 else [sys.executable])
    proc = subprocess.run([*cmd, str(script), str(run_dir)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_two_gloo_ranks_match_one_process(tmp_path, tokenizer, tiny_data):
    one = prepare_run(tmp_path, tokenizer, tiny_data, "one")
    two = prepare_run(tmp_path, tokenizer, tiny_data, "two")
    assert "DONE 1" in launch(one, 1)
    out = launch(two, 2)
    assert out.count("DONE 2") == 2                                   # both ranks return the artifact
    a, b = artifacts.load(one / "distilled"), artifacts.load(two / "distilled")
    assert b.meta["metrics"]["world_size"] == 2
    assert abs(a.meta["metrics"]["final_loss"] - b.meta["metrics"]["final_loss"]) < 1e-3
    ma, mb = load_model(str(a.path)), load_model(str(b.path))
    for (n, p), (_, q) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.allclose(p, q, atol=1e-4), n
    assert not (two / "checkpoints").exists()
