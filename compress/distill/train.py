"""Distill stage: train the student on the teacher's token distributions.

    compress run profile=phone distill.tokens=50000 distill.alpha=0.9 distill.temperature=2

Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, with alpha and T optionally
scheduled. AdamW, linear warmup then cosine decay, gradient accumulation, bf16 autocast on CUDA
and fp32 on CPU. Every `checkpoint_every` optimizer steps the model, optimizer, scheduler, RNG and
data position are saved atomically; a killed run resumes from the last checkpoint.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from .. import artifacts
from ..data import read_texts, token_stream
from ..errors import UserError
from ..models import count_params, load_model, load_tokenizer, save_hf
from .losses import kd_loss, scheduled, warmup_cosine


def config_of(cfg) -> dict:
    return cfg.section("distill")


def run(cfg, src: artifacts.Artifact, out: Path, *, teacher: artifacts.Artifact,
        data: artifacts.Artifact) -> artifacts.Artifact:
    d = cfg.distill
    tok = load_tokenizer(str(src.path))
    student = load_model(str(src.path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seqs = pack(tok, read_texts(data, "train"), d.seq_len)
    check_positions(student, d.seq_len)
    steps = math.ceil(d.tokens / (d.batch * d.seq_len)) if d.tokens else 0
    config = config_of(cfg)
    ckpt_dir = out.parent / "checkpoints" / f"{out.name}-{artifacts.expected_hash('distill', config, [src, teacher, data])}"
    stats = {"steps": steps, "tokens": steps * d.batch * d.seq_len, "device": device}
    if steps:
        model_t = load_model(str(teacher.path)).to(device)
        if model_t.config.vocab_size < student.config.vocab_size:
            raise UserError("the teacher's vocabulary is smaller than the student's; distill needs a shared vocabulary")
        stats.update(train(student.to(device), model_t, seqs, d, steps, ckpt_dir, device))
    with artifacts.writing(out, stage="distill", config=config, parents=[src, teacher, data],
                           format="hf", quant="fp32") as (tmp, meta):
        save_hf(student.float().cpu(), tok, tmp)
        meta["params"] = count_params(student)
        meta["metrics"] = stats
    shutil.rmtree(ckpt_dir, ignore_errors=True)   # the artifact now holds the result
    if ckpt_dir.parent.is_dir() and not any(ckpt_dir.parent.iterdir()):
        ckpt_dir.parent.rmdir()
    return artifacts.load(out)


def pack(tok, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate texts (EOS between) and cut into [N, seq_len] rows; the tail is dropped."""
    ids = token_stream(tok, texts)
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"training data has {len(ids)} tokens, fewer than one sequence of "
                        f"distill.seq_len={seq_len}; give more data or lower distill.seq_len")
    return torch.tensor(ids[:n * seq_len]).view(n, seq_len)


def check_positions(model, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise UserError(f"distill.seq_len={seq_len} is above the model's {limit} positions; use distill.seq_len<={limit}")


def batch_rows(n_rows: int, step: int, batch: int, seed: int) -> list[int]:
    """Row indices of one optimizer step: a fresh permutation per epoch, so the step number alone
    is the data position (a resumed run reads exactly the rows it would have read)."""
    rows = []
    for k in range(batch):
        epoch, pos = divmod(step * batch + k, n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
        rows.append(int(perm[pos]))
    return rows


def train(student, teacher, seqs: torch.Tensor, d, steps: int, ckpt_dir: Path, device: str) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    torch.manual_seed(d.seed)
    random.seed(d.seed)
    teacher.eval()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=d.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = int(d.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    start, history = load_checkpoint(ckpt_dir, student, opt, sched)
    micro = max(1, d.batch // d.grad_accum)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0, tokens_done = time.time(), 0
    cols = [TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeRemainingColumn()]
    with Progress(*cols, transient=True) as bar:
        task = bar.add_task("distill", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            progress = step / max(1, steps - 1)
            T = scheduled(d.temperature, d.temperature_end, progress, d.schedule)
            alpha = scheduled(d.alpha, d.alpha_end, progress, d.schedule)
            rows = batch_rows(len(seqs), step, d.batch, d.seed)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(0, d.batch, micro):
                x = seqs[rows[i:i + micro]].to(device)            # [micro, seq_len]
                with autocast:
                    with torch.inference_mode():
                        t_logits = teacher(x).logits             # [micro, seq_len, V]
                    s_logits = student(x).logits
                    v = s_logits.size(-1)
                    loss, parts = kd_loss(s_logits, t_logits[..., :v].clone(), x, T, alpha)
                loss = loss * len(rows[i:i + micro]) / d.batch
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                kept = (f"the last good checkpoint is kept in {ckpt_dir}" if (ckpt_dir / "checkpoint.pt").is_file()
                        else "no checkpoint was reached yet")
                raise UserError(f"distill loss became {total} at step {step} ({kept}); likely causes: a too high "
                                f"distill.lr, non-finite teacher logits or fp16 overflow: lower distill.lr, then re-run")
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            tokens_done += d.batch * seqs.size(1)
            history.append(round(total, 4))
            tps = tokens_done / max(1e-9, time.time() - t0)
            bar.update(task, advance=1, loss=total, tps=tps)
            if (step + 1) % d.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(ckpt_dir, step + 1, student, opt, sched, history)
    student.eval()
    elapsed = time.time() - t0
    return {"resumed_from_step": start, "final_loss": history[-1] if history else None,
            "loss_curve": history[:: max(1, len(history) // 50)],
            "train_tokens_per_s": round(tokens_done / elapsed, 1) if elapsed > 0 and tokens_done else None}


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, history) -> None:
    """Everything needed to continue exactly: weights, optimizer, scheduler, RNG, data position."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "history": history}
    tmp = ckpt_dir / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / "checkpoint.pt")   # atomic: a kill leaves the previous one intact


def load_checkpoint(ckpt_dir: Path, model, opt, sched) -> tuple[int, list]:
    path = ckpt_dir / "checkpoint.pt"
    if not path.is_file():
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart distillation") from None
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), list(state["history"])
