"""Checks before anything is written or loaded: bad paths, wrong architectures, no space.

Each failure is one UserError line that says what to fix; a run that fails here leaves no run
directory behind.
"""
from __future__ import annotations

from pathlib import Path

from .config import RunConfig


def preflight(cfg: RunConfig) -> None:
    """Refuse early, before anything is written: bad paths, no space, no write permission."""
    import shutil
    from .errors import UserError
    from .models import check_local_arch, resolve_teacher
    for spec in (cfg.teacher, cfg.student.model):
        if spec and not spec.startswith("builtin:"):
            path, gguf_file = resolve_teacher(spec)   # checks the path/id shape without loading
            if not gguf_file and Path(path).is_dir():
                check_local_arch(Path(path))
    if cfg.data and cfg.data.endswith((".txt", ".jsonl", ".json")) and not Path(cfg.data).expanduser().is_file():
        raise UserError(f"data file {cfg.data} does not exist; give a .txt, a .jsonl or an HF dataset name")
    if cfg.data and Path(cfg.data).expanduser().is_file() and not Path(cfg.data).expanduser().read_text(errors="replace").strip():
        raise UserError(f"data {cfg.data} holds no text; give a file with paragraphs (.txt) or rows (.jsonl)")
    base = Path(cfg.out)
    probe = base if base.exists() else base.resolve().parent
    while not probe.exists():
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    if free_mb < 2048:
        raise UserError(f"only {free_mb:.0f} MB free under {probe}; a run needs about 2 GB for the built-in "
                        f"teacher: free some space or set out=<dir on a larger disk>")
    import os
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {probe}; set out=<a writable directory>")
