"""The pieces of the distill loop (train.py:train): setup, one optimizer step, checkpoints, the summary.

    s, start, history = setup(student, teacher_models, terms, d, steps, device, vocab, ckpt_dir)
    loss = forward_backward(s, signal, seqs, rows, terms, T, d, step)   # gradients of one step
    optimizer_step(s)                                                   # clip, AdamW, LR schedule

One process, DDP and FSDP differ only in setup (FSDP shards the student and owns the gradient
averaging) and in where a checkpoint's state is gathered; the step reads them from `Setup`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UserError
from . import dist, kd
from .losses import warmup_cosine


@dataclass
class Setup:
    """What the loop trains, where, and with what."""
    student: torch.nn.Module        # the HF model (under FSDP sharded in place)
    body: torch.nn.Module           # forward to last hidden states [b, S, H_s]: the decoder, or the FSDP root
    head: torch.nn.Module           # the student's lm_head, applied a chunk of tokens at a time (kd.py)
    proj: torch.nn.Linear | None    # Linear(H_s -> H_t) for hidden-state terms when widths differ
    root: dist.Sharded | None       # the FSDP root, None in one process or under DDP
    params: list                    # everything AdamW updates (under FSDP: DTensor shards)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    micro: int                      # rows per micro-batch on this rank
    share: int                      # scales the loss so FSDP's averaged gradients equal DDP's summed ones
    autocast: torch.autocast        # bf16 on CUDA, off (fp32) on the CPU
    device: str
    vocab: int                      # the shared vocabulary: student logits past it are dropped


def setup(student, teacher_models: list, terms: dict, d, steps: int, device: str, vocab: int,
          ckpt_dir: Path) -> tuple[Setup, int, list]:
    """(setup, step to start at, loss history so far). The student is already placed (on `device`,
    or on the CPU under FSDP); a checkpoint in ckpt_dir is resumed from."""
    rank, world = dist.world()
    student.train()
    if d.activation_checkpointing:
        activation_checkpointing(student, True)
    proj = projection(student, teacher_models, terms)
    if proj is not None:
        proj.to(device)
    body, head = kd.body_and_head(student)
    root = None
    if d.parallel == "fsdp" and world > 1:   # spec.check made distill.batch divisible by world
        body = root = dist.shard(student, proj)
    params = list(root.parameters()) if root is not None else \
        list(student.parameters()) + (list(proj.parameters()) if proj is not None else [])
    opt = torch.optim.AdamW(params, lr=d.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = int(d.warmup * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warm))
    start, history = load_checkpoint(ckpt_dir, student, opt, sched, proj, root)
    cuda = device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    s = Setup(student=student, body=body, head=head, proj=proj, root=root, params=params, opt=opt, sched=sched,
              micro=max(1, max(1, d.batch // d.grad_accum) // world),
              # DDP sums the ranks' gradients; FSDP averages them, so each rank's share is scaled up by world
              share=world if root is not None else 1, autocast=autocast, device=device, vocab=vocab)
    return s, start, history


def projection(student, teacher_models, terms: dict):
    """Linear(H_s -> H_t) for hidden-state terms when widths differ (trained, not shipped), else None."""
    if not any(n.startswith("hidden_") for n in terms) or not teacher_models:
        return None
    hs, ht = student.config.hidden_size, teacher_models[0].config.hidden_size
    return None if hs == ht else torch.nn.Linear(hs, ht, bias=False)


def forward_backward(s: Setup, signal, seqs: torch.Tensor, rows: list[int], terms: dict, T: float, d,
                     step: int) -> float:
    """Gradients of one optimizer step: this rank's `rows` of seqs [N, S], micro-batch by micro-batch
    (forward to hidden states, chunked loss and its backward), then summed over ranks. Returns the
    step's loss, a mean over the global batch of d.batch rows."""
    s.opt.zero_grad(set_to_none=True)
    total = 0.0
    for i in range(0, len(rows), s.micro):
        part = rows[i:i + s.micro]
        x = seqs[part].to(s.device)                                  # [b, S]
        if d.mode == "onpolicy" and on_policy_draw(d, step, i) < d.lmbda:
            x = student_continues(s.student, x, d.seed + step * 1000 + i)
        with s.autocast:
            teacher = signal.batch(x, part, terms)                   # what the loss terms read from the teacher
            h_s = s.body(input_ids=x).last_hidden_state              # [b, S, H_s]
            loss, _ = kd.chunked_loss_backward(h_s, s.head, teacher, x, terms, T, s.vocab, d.beta, d.top_k,
                                               s.proj, d.chunk, scale=s.share * len(part) / d.batch)
        total += loss * len(part) / d.batch
    if s.root is None:   # FSDP reduces its own gradients in backward
        dist.all_reduce_grads(s.params)
    return dist.sum_scalar(total)


def optimizer_step(s: Setup) -> None:
    torch.nn.utils.clip_grad_norm_(s.params, 1.0)
    s.opt.step()
    s.sched.step()


def summary(s: Setup, d, start: int, history: list, tokens_done: int, t0: float) -> tuple[dict, dict | None]:
    """Back to eval mode; (stats, None), or under FSDP (stats, the whole root state dict on rank 0),
    since the student itself is left sharded. Every rank calls it."""
    s.student.eval()
    if d.activation_checkpointing:
        activation_checkpointing(s.student, False)
    elapsed = time.time() - t0
    out = {"resumed_from_step": start, "final_loss": history[-1] if history else None,
           "loss_curve": history[:: max(1, len(history) // 50)],
           "train_tokens_per_s": round(tokens_done / elapsed, 1) if elapsed > 0 and tokens_done else None}
    if s.device.startswith("cuda"):
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if s.root is not None:   # how much of the trained state one rank holds
        out["params_on_rank0"] = sum(p.to_local().numel() for p in s.params)
    return out, (dist.full_state(s.root)[0] if s.root is not None else None)


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


# ---------------------------------------------------------------- on-policy data (distill.mode=onpolicy)

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


# ---------------------------------------------------------------- checkpoints

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
