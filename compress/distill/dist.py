"""Data parallelism for the distill stage under torchrun (gloo on CPU, NCCL on CUDA).

    torchrun --nproc_per_node=2 -m compress run profile=phone                         # DDP
    torchrun --nproc_per_node=8 -m compress run profile=... distill.parallel=fsdp     # FSDP

Every rank reads its share of each optimizer step's rows and backpropagates its own micro-batches.
DDP (default): every rank holds the whole student; the gradients are summed across ranks in one
flat all-reduce per step, so every rank takes the same AdamW step. FSDP (`distill.parallel=fsdp`,
torch's fully_shard): each decoder layer's parameters, gradients and AdamW state are split across
ranks and gathered only while that layer runs, for students whose training state does not fit one
device. Either way the result equals a one-process run with the same global batch. Only rank 0
writes checkpoints and artifacts; the other ranks wait for it at barriers. Without torchrun
(WORLD_SIZE unset) every function here is a no-op.
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


class Sharded(torch.nn.Module):
    """The FSDP root: the student's decoder body (forward returns its output, whose
    last_hidden_state feeds the chunked loss) plus the trained hidden-state projection, if any.
    Embeddings, final norm, the (tied) lm_head and the projection form the root unit, which FSDP
    keeps gathered from the forward until the backward, so the chunked loss can use the lm_head."""

    def __init__(self, model, proj=None):
        super().__init__()
        self.model, self.proj = model, proj

    def forward(self, **kwargs):
        return getattr(self.model, self.model.base_model_prefix)(**kwargs)


def shard(model, proj=None) -> Sharded:
    """Shard the student in place across the ranks: one FSDP unit per decoder layer, one for the rest."""
    from torch.distributed.fsdp import fully_shard
    for layer in getattr(model, model.base_model_prefix).layers:
        fully_shard(layer)
    root = Sharded(model, proj)
    fully_shard(root)
    return root


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state(root: Sharded, opt=None) -> tuple[dict, dict | None]:
    """(model, optimizer or None) state dicts gathered whole, on CPU, on rank 0 (empty elsewhere);
    every rank must call it. Keys are the root's: 'model.<student key>' and 'proj.*'."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict
    if opt is None:
        return get_model_state_dict(root, options=_options(cpu_offload=True)), None
    return get_state_dict(root, opt, options=_options(cpu_offload=True))


def student_state(full: dict) -> dict:
    """The student's own state dict out of a root state dict."""
    return {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}


def load_full_state(root: Sharded, opt, model_sd: dict, opt_sd: dict) -> None:
    """Each rank takes its shard of whole state dicts (read from a checkpoint by every rank)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(root, opt, model_state_dict=model_sd, optim_state_dict=opt_sd, options=_options())
