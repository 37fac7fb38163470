"""Data parallelism for the distill stage under torchrun (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node=2 -m compress run profile=phone

Every rank holds the student and the teacher, reads its share of each optimizer step's rows and
backpropagates its own micro-batches; the gradients are then summed across ranks in one bucketed
all-reduce per step, so every rank takes the same AdamW step and the result equals a one-process
run with the same global batch. Only rank 0 writes checkpoints and artifacts; the other ranks wait
for it at barriers. Without torchrun (WORLD_SIZE unset) every function here is a no-op.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


_left = False   # set by leave(): rank 0 goes on alone


def world() -> tuple[int, int]:
    """(rank, world size), initialising the process group on first use under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1 or _left:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), size


def leave() -> bool:
    """End the data-parallel part: every rank syncs and drops the process group; True on rank 0,
    which carries on alone (export, evaluate, report), False on the others, which stop."""
    global _left
    rank, size = world()
    if size > 1:
        dist.barrier()
        dist.destroy_process_group()
        _left = True
    return rank == 0


def is_main() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's value of a picklable object on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if world()[1] > 1 else "cuda"


def all_reduce_grads(params) -> None:
    """Sum every parameter's gradient across ranks, in one flat buffer (one collective per step)."""
    if world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_scalar(x: float) -> float:
    if world()[1] == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device())
    dist.all_reduce(t)
    return float(t)
