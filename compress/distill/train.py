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
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from .. import artifacts
from ..data import read_jsonl, read_texts, token_stream, write_jsonl
from ..errors import UserError
from ..models import count_params, load_model, load_tokenizer, save_hf
from . import cache, dist, kd, seqkd, teachers
from .losses import scheduled, warmup_cosine
from .spec import DEFAULT_ALPHA, TERMS, parse_cache, parse_loss


def config_of(cfg) -> dict:
    return cfg.section("distill")


def run(cfg, src: artifacts.Artifact, out: Path, *, teacher: artifacts.Artifact,
        data: artifacts.Artifact) -> artifacts.Artifact:
    d = cfg.distill
    tok = load_tokenizer(str(src.path))
    student = load_model(str(src.path))
    device = dist.device()
    seqs = pack(tok, read_texts(data, "train"), d.seq_len)
    check_positions(student, d.seq_len)
    steps = math.ceil(d.tokens / (d.batch * d.seq_len)) if d.tokens else 0
    config = config_of(cfg)
    ckpt_dir = out.parent / "checkpoints" / f"{out.name}-{artifacts.expected_hash('distill', config, [src, teacher, data])}"
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
        with artifacts.writing(out, stage="distill", config=config, parents=[src, teacher, data],
                               format="hf", quant="fp32") as (tmp, meta):
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


def projection(student, teacher_models, terms: dict):
    """Linear(H_s -> H_t) for hidden-state terms when widths differ (trained, not shipped), else None."""
    if not any(n.startswith("hidden_") for n in terms) or not teacher_models:
        return None
    hs, ht = student.config.hidden_size, teacher_models[0].config.hidden_size
    return None if hs == ht else torch.nn.Linear(hs, ht, bias=False)


def train(student, teacher_models: list, weights: list, seqs: torch.Tensor, d, steps: int, ckpt_dir: Path,
          device: str, vocab: int, store=None) -> tuple[dict, dict | None]:
    """(stats, None), or under FSDP (stats, the whole root state dict on rank 0) since the student
    itself is left sharded."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
    torch.manual_seed(d.seed)
    random.seed(d.seed)
    rank, world = dist.world()
    student.train()
    if d.activation_checkpointing:
        activation_checkpointing(student, True)
    proj = projection(student, teacher_models, terms_at(d, 0.0))
    if proj is not None:
        proj.to(device)
    body_s, head_s = kd.body_and_head(student)
    root = None
    if d.parallel == "fsdp" and world > 1:   # spec.check made distill.batch divisible by world
        body_s = root = dist.shard(student, proj)
    params = list(root.parameters()) if root is not None else \
        list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.AdamW(params, lr=d.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = int(d.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    start, history = load_checkpoint(ckpt_dir, student, opt, sched, proj, root)
    micro = max(1, d.batch // d.grad_accum)
    # DDP sums the ranks' gradients; FSDP averages them, so each rank's share is scaled up by world
    share = world if root is not None else 1
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    bodies_t = [kd.body_and_head(m) for m in teacher_models]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0, tokens_done = time.time(), 0
    cols = [TextColumn("distill"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeRemainingColumn()]
    with Progress(*cols, transient=True, disable=rank != 0) as bar:
        task = bar.add_task("distill", total=steps, completed=start, loss=float("nan"), tps=0.0)
        for step in range(start, steps):
            progress = step / max(1, steps - 1)
            T = scheduled(d.temperature, d.temperature_end, progress, d.schedule)
            terms = terms_at(d, progress)
            rows = batch_rows(len(seqs), step, d.batch, d.seed)[rank::world]   # this rank's share
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(0, len(rows), max(1, micro // world)):
                part = rows[i:i + max(1, micro // world)]
                x = seqs[part].to(device)                                    # [b, seq_len]
                if d.mode == "onpolicy" and on_policy_draw(d, step, i) < d.lmbda:
                    x = student_continues(student, x, d.seed + step * 1000 + i)
                with autocast:
                    tb = kd.Teachers(weights=weights, heads=[h for _, h in bodies_t])
                    if any(TERMS[n] in ("dist", "topk", "hidden") for n in terms) and store is None:
                        with torch.inference_mode():
                            tb.hidden = [body(input_ids=x).last_hidden_state for body, _ in bodies_t]   # [b, S, H_t]
                    if store is not None:
                        tb.cached = tuple(c.to(device) for c in cache.rows_of(store, part))
                    h_s = body_s(input_ids=x).last_hidden_state              # [b, S, H_s]
                    loss, _ = kd.chunked_loss_backward(h_s, head_s, tb, x, terms, T, vocab, d.beta, d.top_k,
                                                       proj, d.chunk, scale=share * len(part) / d.batch)
                total += loss * len(part) / d.batch
            if root is None:
                dist.all_reduce_grads(params)
            total = dist.sum_scalar(total)
            if not math.isfinite(total):
                kept = (f"the last good checkpoint is kept in {ckpt_dir}" if (ckpt_dir / "checkpoint.pt").is_file()
                        else "no checkpoint was reached yet")
                raise UserError(f"distill loss became {total} at step {step} ({kept}); likely causes: a too high "
                                f"distill.lr, non-finite teacher logits or fp16 overflow: lower distill.lr, then re-run")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            tokens_done += d.batch * seqs.size(1)
            history.append(round(total, 4))
            tps = tokens_done / max(1e-9, time.time() - t0)
            bar.update(task, advance=1, loss=total, tps=tps)
            if (step + 1) % d.checkpoint_every == 0 and step + 1 < steps:
                save_checkpoint(ckpt_dir, step + 1, student, opt, sched, history, proj, root)
    student.eval()
    if d.activation_checkpointing:
        activation_checkpointing(student, False)
    elapsed = time.time() - t0
    out = {"resumed_from_step": start, "final_loss": history[-1] if history else None,
           "loss_curve": history[:: max(1, len(history) // 50)],
           "train_tokens_per_s": round(tokens_done / elapsed, 1) if elapsed > 0 and tokens_done else None}
    if cuda:
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if root is not None:   # how much of the trained state one rank holds
        out["params_on_rank0"] = sum(p.to_local().numel() for p in params)
    return out, (dist.full_state(root)[0] if root is not None else None)


def activation_checkpointing(model, on: bool) -> None:
    """Recompute the decoder layers' activations in backward (transformers >= 5.x names it
    activation_checkpointing_*, earlier releases gradient_checkpointing_*)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def on_policy_draw(d, step: int, i: int) -> float:
    """A uniform draw fixed by (seed, step, micro-batch): a resumed run makes the same choices."""
    return float(torch.rand(1, generator=torch.Generator().manual_seed(d.seed * 100_003 + step * 1009 + i)))


@torch.no_grad()
def student_continues(student, x, seed: int):
    """GKD's on-policy data: keep the first half of each row [b, S] and let the student sample the
    rest (temperature 1, no EOS stop, so the row keeps its length); the teacher then scores the
    student's own tokens through the usual loss terms."""
    half = x.size(1) // 2
    torch.manual_seed(seed)
    was_training = student.training
    student.eval()
    out = student.generate(x[:, :half], max_new_tokens=x.size(1) - half, min_new_tokens=x.size(1) - half,
                           do_sample=True, top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0)
    student.train(was_training)
    return out[:, :x.size(1)]


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, history, proj=None, root=None) -> None:
    """Everything needed to continue exactly: weights, optimizer, scheduler, RNG, data position.
    Every rank calls it (under FSDP the state is gathered from all of them); rank 0 writes."""
    if root is not None:
        model_sd, opt_sd = dist.full_state(root, opt)
    else:
        model_sd, opt_sd = model.state_dict(), opt.state_dict()
    if not dist.is_main():
        return
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "sharded": root is not None, "model": model_sd, "optimizer": opt_sd,
             "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
             "history": history, "proj": proj.state_dict() if proj is not None and root is None else None}
    tmp = ckpt_dir / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / "checkpoint.pt")   # atomic: a kill leaves the previous one intact


def load_checkpoint(ckpt_dir: Path, model, opt, sched, proj=None, root=None) -> tuple[int, list]:
    path = ckpt_dir / "checkpoint.pt"
    if not path.is_file():
        return 0, []
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart distillation") from None
    if bool(state.get("sharded")) != (root is not None):
        raise UserError(f"checkpoint {path} was written by a {'FSDP' if state.get('sharded') else 'one-process or DDP'} "
                        f"run: resume it the same way, or delete it to restart distillation")
    if root is not None:   # every rank read the whole state; each keeps its shard
        dist.load_full_state(root, opt, state["model"], state["optimizer"])
    else:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if proj is not None and root is None and state.get("proj"):
        proj.load_state_dict(state["proj"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"]), list(state["history"])
