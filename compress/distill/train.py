"""Distill stage: train the student on the teacher's token distributions.

    compress run profile=phone distill.tokens=50000 distill.alpha=0.9 distill.temperature=2
    compress run profile=phone distill.loss=jsd:0.9,ce:0.1 distill.beta=0.5
    compress run profile=phone distill.teacher_cache=topk:32 distill.loss=topk:0.9,ce:0.1
    torchrun --nproc_per_node=2 -m compress run profile=phone      # data-parallel (DDP)
    torchrun --nproc_per_node=2 -m compress run profile=phone distill.parallel=fsdp   # sharded student

Loss: the weighted terms of `distill.loss` (spec.py; default alpha * T^2 * KL(teacher_T ||
student_T) + (1 - alpha) * CE), computed chunk by chunk over tokens (kd.py) so full-vocabulary
logits of both models never exist at once; alpha and T schedulable. Teachers run in inference
mode (bf16 on CUDA); several are averaged (teachers.py); or their top-k comes from a disk cache
(cache.py) and no teacher is loaded at all. AdamW, linear warmup then cosine decay, gradient
accumulation, bf16 autocast on CUDA and fp32 on CPU. Every `checkpoint_every` optimizer steps the
model, optimizer, scheduler, RNG and data position are saved atomically; a killed run resumes from
the last checkpoint.

The loop, `train` below, reads top to bottom: setup (step.py: training mode, FSDP sharding,
AdamW and schedule, resume), the teacher signal (teachers.py: live teachers, the top-k cache, or
none), then per step the gradients (step.forward_backward), the NaN policy, the update
(step.optimizer_step) and every `checkpoint_every` steps a checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .. import artifacts
from ..data import read_jsonl, read_texts, token_stream, write_jsonl
from ..errors import UserError
from ..models import count_params, load_model, load_tokenizer, save_hf
from ..stage import current, stage
from . import cache, dist, seqkd, teachers
from .losses import scheduled
from .spec import DEFAULT_ALPHA, parse_cache, parse_loss
from .step import forward_backward, optimizer_step, save_checkpoint, setup, summary


SEQKD_GEN = ("gen.prompts", "gen.seed", "gen.max_new_tokens", "gen.temperature", "gen.top_p")


def _reads(cfg) -> tuple:
    # Sequence-level KD samples the teacher with the data stage's generation settings.
    return ("distill", "trust_remote_code") + (SEQKD_GEN if cfg.distill.mode == "seqkd" else ())


@stage("distill", inputs=("teacher", "data"), reads=_reads, format="hf")
def run(cfg, src: artifacts.Artifact, out: Path, *, teacher: artifacts.Artifact,
        data: artifacts.Artifact) -> artifacts.Artifact:
    d = cfg.distill
    tok = load_tokenizer(str(src.path))
    student = load_model(str(src.path))
    device = dist.device()
    seqs = pack(tok, read_texts(data, "train"), d.seq_len)
    check_positions(student, d.seq_len)
    steps = math.ceil(d.tokens / (d.batch * d.seq_len)) if d.tokens else 0
    ckpt_dir = out.parent / "checkpoints" / f"{out.name}-{current().hash}"
    rank, world = dist.world()
    full = None
    # under FSDP the student stays on the CPU: fully_shard moves one unit at a time to the device and
    # keeps only its shard there, so a student larger than one device never lands on it whole
    placed = student if d.parallel == "fsdp" and world > 1 else student.to(device)
    stats = {"steps": steps, "tokens": steps * d.batch * d.seq_len, "device": device, "world_size": world,
             "parallel": d.parallel if world > 1 else None}
    if steps and d.mode == "seqkd":
        texts, kept = seqkd_texts(cfg, teacher, tok, ckpt_dir, stats)
        res, full = train(placed, [], [], pack(tok, texts, d.seq_len), d, steps, ckpt_dir, device,
                          vocab=student.config.vocab_size)
    elif steps:
        models_t, weights, vocab, store = teacher_side(cfg, teacher, tok, student, seqs, out, device, stats)
        res, full = train(placed, models_t, weights, seqs, d, steps, ckpt_dir, device,
                          vocab=vocab, store=store)
    if steps:
        stats.update(res)
    if full is not None and rank == 0:   # FSDP left the student sharded: rebuild it whole from the gathered state
        student = load_model(str(src.path))
        student.load_state_dict(dist.student_state(full))
    if rank == 0:
        with artifacts.writing(out, quant="fp32") as (tmp, meta):
            save_hf(student.float().cpu(), tok, tmp)
            if steps and d.mode == "seqkd":
                write_jsonl(tmp / "seqkd.jsonl", kept)
            meta["params"] = count_params(student)
            meta["metrics"] = stats
        shutil.rmtree(ckpt_dir, ignore_errors=True)   # the artifact now holds the result
        if ckpt_dir.parent.is_dir() and not any(ckpt_dir.parent.iterdir()):
            ckpt_dir.parent.rmdir()
    dist.barrier()
    return artifacts.load(out)


def teacher_side(cfg, teacher, tok, student, seqs, out: Path, device: str, stats: dict):
    """(teacher models, mixture weights, shared vocabulary, top-k cache or None). With
    distill.teacher_cache the teachers run once, on rank 0, to fill the cache, and are dropped."""
    d = cfg.distill
    t_specs, weights = teachers.specs(str(teacher.path), d), teachers.weights(d)
    k = parse_cache(d.teacher_cache)
    if k is None:
        models_t = teachers.load(t_specs, tok, device, cfg.trust_remote_code)
        vocab = teachers.shared_vocab(tok, [student.config.vocab_size, *(m.config.vocab_size for m in models_t)])
        stats["vocab"] = vocab
        return models_t, weights, vocab, None
    ident = [teacher.meta.get("hash", ""), *t_specs[1:]]   # the teacher artifact, then extra teachers
    path = out.parent / "teacher-cache" / f"topk{k}-{cache.key(ident, weights, seqs, k)}"
    if cache.open_cache(path) is None and dist.is_main():
        models_t = teachers.load(t_specs, tok, device, cfg.trust_remote_code)
        vocab = teachers.shared_vocab(tok, [student.config.vocab_size, *(m.config.vocab_size for m in models_t)])
        cache.build(path, models_t, weights, seqs, k, vocab, device, max(1, d.batch // d.grad_accum), d.chunk)
        del models_t   # training reads the cache: no resident teacher
    dist.barrier()
    store = cache.open_cache(path)
    stats["teacher_cache"] = {"path": str(path), **store[2]}
    stats["vocab"] = store[2]["vocab"]
    return [], weights, store[2]["vocab"], store


def seqkd_texts(cfg, teacher, tok, ckpt_dir: Path, stats: dict) -> tuple[list[str], list[dict]]:
    """The verified teacher traces (sampled on rank 0 once; a resumed run reads them back)."""
    saved = ckpt_dir / "seqkd.jsonl"
    if dist.is_main():
        if saved.is_file():
            kept = read_jsonl(saved)
            counts = json.loads((ckpt_dir / "seqkd-counts.json").read_text())
        else:
            kept, counts = seqkd.sample_and_verify(cfg, teacher)
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            artifacts.write_json_atomic(ckpt_dir / "seqkd-counts.json", counts)
            write_jsonl(saved, kept)   # written last: its presence means both are complete
    kept, counts = dist.broadcast((kept, counts) if dist.is_main() else None)
    stats["seqkd"] = counts
    return [seqkd.as_text(tok, r) for r in kept], kept


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


def terms_at(d, progress: float) -> dict[str, float]:
    """The loss terms and weights at this point of training (alpha's schedule, zero weights dropped)."""
    if d.mode == "seqkd":
        return {"ce": 1.0}
    if d.loss is None:
        a0 = DEFAULT_ALPHA if d.alpha is None else d.alpha
        terms = parse_loss(None, scheduled(a0, d.alpha_end, progress, d.schedule))
    else:
        terms = parse_loss(d.loss)
    return {n: w for n, w in terms.items() if w > 0}


def train(student, teacher_models: list, weights: list, seqs: torch.Tensor, d, steps: int, ckpt_dir: Path,
          device: str, vocab: int, store=None) -> tuple[dict, dict | None]:
    """Train the placed student for `steps` optimizer steps on seqs [N, S]; the teacher side is
    teacher_models with their mixture weights, or a top-k cache `store`, or neither (seqkd).
    Returns (stats, None), or under FSDP (stats, the whole root state dict on rank 0) since the
    student itself is left sharded."""
    torch.manual_seed(d.seed)
    random.seed(d.seed)
    rank, world = dist.world()
    s, start, history = setup(student, teacher_models, terms_at(d, 0.0), d, steps, device, vocab, ckpt_dir)
    signal = teachers.signal(teacher_models, weights, store, device)
    t0, tokens_done = time.time(), 0
    with progress_bar(steps, start, rank) as advance:
        for step in range(start, steps):
            progress = step / max(1, steps - 1)
            T = scheduled(d.temperature, d.temperature_end, progress, d.schedule)
            rows = batch_rows(len(seqs), step, d.batch, d.seed)[rank::world]   # this rank's share
            loss = forward_backward(s, signal, seqs, rows, terms_at(d, progress), T, d, step)
            if not math.isfinite(loss):   # stop before the update: the last checkpoint stays good
                raise non_finite(loss, step, ckpt_dir)
            optimizer_step(s)
            tokens_done += d.batch * seqs.size(1)
            history.append(round(loss, 4))
            advance(loss, tokens_done / max(1e-9, time.time() - t0))
            if (step + 1) % d.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(ckpt_dir, step + 1, s.student, s.opt, s.sched, history, s.proj, s.root)
    return summary(s, d, start, history, tokens_done, t0)


@contextmanager
def progress_bar(steps: int, start: int, rank: int):
    """A transient bar on rank 0; yields advance(loss, tokens per second), called once per step."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    cols = [TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeRemainingColumn()]
    with Progress(*cols, transient=True, disable=rank != 0) as bar:
        task = bar.add_task("distill", total=steps, completed=start, loss=float("nan"), tps=0.0)
        yield lambda loss, tps: bar.update(task, advance=1, loss=loss, tps=tps)


def non_finite(loss: float, step: int, ckpt_dir: Path) -> UserError:
    """The NaN policy's one-line error: where the last good state is, and what to change."""
    kept = (f"the last good checkpoint is kept in {ckpt_dir}" if (ckpt_dir / "checkpoint.pt").is_file()
            else "no checkpoint was reached yet")
    return UserError(f"distill loss became {loss} at step {step} ({kept}); likely causes: a too high "
                     f"distill.lr, non-finite teacher logits or fp16 overflow: lower distill.lr, then re-run")
