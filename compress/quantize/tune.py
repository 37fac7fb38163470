"""The training half of quantization-aware distillation (qad.py, qad_onnx.py): a model whose
quantized matrices are their stored blocks, w = d * q + m, with the block scales d (and mins m)
trained against the teacher's next-token distributions while the integer codes q stay fixed.

    layers = attach(model, {"model.layers.0.self_attn.q_proj": (q, d, m), ...})
    history = tune(model, teacher, seqs, steps=60, lr=2e-3, ckpt_dir=..., every=10, hidden=200.0)
    d, m = layers["model.layers.0.self_attn.q_proj"].stored()       # float32, ready to pack

Scales are trained as relative changes, d = d0 * (1 + s), and mins in units of their block's
scale, m = m0 + d0 * t: one learning rate then fits blocks whose scales differ by orders of
magnitude. K-quants, whose sub-block scales are integers under a float16 super-scale, train the
same way and are then put on that grid (Gridded.snap). The loss is KL(teacher || model) per
token over the whole vocabulary, the same quantity the evaluate stage reports, plus, when the
model is the teacher's own quantized copy, a term pulling every layer's hidden
states towards the teacher's (hidden_loss).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError

CACHE_BYTES = 4e9   # the teacher's logits kept for reuse across epochs, at most


class Blockwise(torch.nn.Module):
    """A linear layer y = x W^T + b whose weight W [out, in] is held as blocks of `in / blocks` columns:
    W = d * q + m, q integer codes [out, blocks, size] (fixed), d and m [out, blocks] (trained)."""

    def __init__(self, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("q", q.float(), persistent=False)
        self.register_buffer("d0", d.float(), persistent=False)
        self.register_buffer("m0", m.float() if m is not None else None, persistent=False)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else None, persistent=False)
        # Adam moves every scale by about lr per step whatever its gradient; a block's rounding error,
        # which the scale can make up for, shrinks with its number of levels: a finer format takes
        # proportionally smaller steps (1 for 4-bit codes, 1/16 for Q8_0's 8-bit ones)
        self.lr_scale = min(1.0, 16 / (int(self.q.max() - self.q.min()) + 1)) if self.q.numel() else 1.0
        self.scale = torch.nn.Parameter(torch.zeros_like(self.d0))
        self.shift = torch.nn.Parameter(torch.zeros_like(self.d0)) if m is not None else None

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d, m): what the file will hold, float32 [out, blocks]."""
        d = self.d0 * (1 + self.scale)
        m = self.m0 + self.d0 * self.shift if self.shift is not None else None
        return d, m

    @property
    def weight(self) -> torch.Tensor:
        """W [out, in] as the file stores it (a property, as nn.Linear's is: HF code reads .weight)."""
        d, m = self.stored()
        w = d[..., None] * self.q
        if m is not None:
            w = w + m[..., None]
        return w.reshape(w.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Gridded(Blockwise):
    """A Blockwise layer of a K-quant (kquants.py): a sub-block's scale is D * sc, a float16
    super-scale D per 256 weights times a small integer sc, and its min likewise -Dmin * mn.

    Its sub-block scales and mins train as Blockwise's, continuous, from the file's values; snap()
    then puts them on the grid, choosing each float16 super-scale near the file's by the least
    squared error of its sub-blocks' trained scales (not of the weights), and from then on the
    layer computes exactly what the file will hold.
    Measured on a tiny Q4_K_M, the alternatives lost: rounding onto the grid in every step
    (straight through) made the fit worse than the file, as a 6-bit step is 2-3 % of a scale and
    the scales flip back and forth across it; training the super-scales after the snap raised the
    held-out KLD the snap had reached."""

    SEARCH = 256   # float16 steps either side of the file's super-scale tried at snap (±12-25 %)

    def __init__(self, q, d, m, bias, grid: tuple):
        super().__init__(q, d, m, bias)
        D, Dmin, (lo, hi) = grid
        self.per, self.lo, self.hi = d.shape[1] // D.shape[1], lo, hi
        self.register_buffer("D0", D.float(), persistent=False)
        self.register_buffer("Dmin0", Dmin.float() if Dmin is not None else None, persistent=False)
        self.register_buffer("sc", None, persistent=False)   # the sub-block integers, once snapped
        self.register_buffer("mn", None, persistent=False)

    def snap(self) -> None:
        """Put the trained sub-block scales (and mins) on the grid; they train no further.

        A sub-block's weights move by e_d * q + e_m when its scale moves by e_d and its min by e_m:
        the scales are fitted with each sub-block weighted by how much its codes spread (sum of
        (q - mean q)^2, or of q^2 without mins), and each min then absorbs its scale's rounding
        error at the sub-block's mean code before it is rounded itself."""
        with torch.no_grad():
            d, m = Blockwise.stored(self)
            if m is None:
                self.D0, self.sc = self._fit(d, self.D0, self.lo, self.q.square().sum(-1))
            else:
                mean = self.q.mean(-1)
                self.D0, self.sc = self._fit(d, self.D0, self.lo, (self.q - mean[..., None]).square().sum(-1))
                missed = self.D0.repeat_interleave(self.per, 1) * self.sc - d
                self.Dmin0, self.mn = self._fit(-(m - missed * mean), self.Dmin0, 0, torch.ones_like(d))
        for p in self.parameters():
            p.requires_grad_(False)

    def _fit(self, s: torch.Tensor, D0: torch.Tensor, lo: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D [rows, supers] float16 values, integers [rows, subs]): of the float16 values within
        SEARCH steps of the file's D (or, where that is 0, of the largest trained scale over the
        largest integer), the one whose integers reproduce the trained scales `s` with the least
        `weight`ed squared error."""
        S = s.view(s.shape[0], -1, self.per)
        W = weight.view(S.shape) + 1e-6   # all-zero codes: any scale computes the same; keep it near the trained one
        base = torch.where(D0 != 0, D0, S.abs().amax(-1) / self.hi).half()
        bits = base.view(torch.int16).int()
        negative = bits < 0        # float16 bit patterns: a larger int16 is a larger magnitude for either sign
        best_err, best_D, best_k = None, None, None
        for step in range(-self.SEARCH, self.SEARCH + 1):
            b = torch.where(negative, (bits + step).clamp(-32767, -1025), (bits + step).clamp(1, 0x7BFF))
            D = torch.where(base != 0, b.short().view(torch.float16), 0).float()[..., None]
            k = torch.where(D != 0, S / torch.where(D != 0, D, 1), 0).round().clamp(lo, self.hi)
            err = (W * (S - D * k).square()).sum(-1)
            if best_err is None:
                best_err, best_D, best_k = err, D, k
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_D = torch.where(better[..., None], D, best_D)
            best_k = torch.where(better[..., None], k, best_k)
        return best_D[..., 0], best_k.reshape(s.shape)

    def ints(self) -> tuple:
        """(D, sc, Dmin, mn): the float16 super-scales and sub-block integers the file will hold."""
        if self.sc is None:
            raise RuntimeError("snap() the layer before reading the integers the file holds")
        return self.D0, self.sc, self.Dmin0 if self.mn is not None else None, self.mn

    def stored(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.sc is None:
            return Blockwise.stored(self)
        D, sc, Dmin, mn = self.ints()
        d = D.repeat_interleave(self.per, 1) * sc
        return d, None if Dmin is None else -(Dmin.repeat_interleave(self.per, 1) * mn)


def attach(model, blocks: dict[str, tuple]) -> dict[str, Blockwise]:
    """Replace each named nn.Linear of `model` with a Blockwise layer built from (q, d, m) numpy
    arrays in the module's own row order, or a Gridded one from (q, d, m, (D, Dmin, sc range));
    every other parameter is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, (q, d, m, *grid) in blocks.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, child)
        if tuple(linear.weight.shape) != (q.shape[0], q.shape[1] * q.shape[2]):
            raise ValueError(f"{name}: stored blocks {q.shape} do not match the weight {tuple(linear.weight.shape)}")
        args = (torch.from_numpy(q), torch.from_numpy(d), None if m is None else torch.from_numpy(m), linear.bias)
        if grid:
            D, Dmin, bounds = grid[0]
            layer = Gridded(*args, (torch.from_numpy(D), None if Dmin is None else torch.from_numpy(Dmin), bounds))
        else:
            layer = Blockwise(*args)
        setattr(owner, child, layer)
        layers[name] = layer
    return layers


def kl_loss(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || model), nats. Both [..., V]."""
    from ..distill.losses import forward_kl
    return forward_kl(torch.log_softmax(logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1)).mean()


def hidden_loss(states, teacher_states) -> torch.Tensor:
    """Mean over layers of each layer's squared error against the teacher's hidden states, relative
    to their mean square (so every layer counts alike, whatever its scale)."""
    terms = [(h - t.float()).square().mean() / t.float().square().mean().clamp_min(1e-12)
             for h, t in zip(states, teacher_states, strict=True)]
    return torch.stack(terms).mean()


def tune(model, teacher, seqs: torch.Tensor, steps: int, lr: float, ckpt_dir: Path, every: int,
         batch: int = 1, log=None, hidden: float = 0.0) -> dict:
    """Train the Blockwise scales of `model` for `steps` steps of `batch` sequences of `seqs`
    [N, L] (cycled), resuming from `ckpt_dir`, on KL(teacher || model) plus `hidden` times
    hidden_loss (the model must then have the teacher's layers). Returns the history; its "loss"
    is the KL alone."""
    groups: dict[float, list] = {}
    for m in model.modules():
        if isinstance(m, Blockwise):
            groups.setdefault(m.lr_scale, []).extend(p for p in m.parameters(recurse=False) if p.requires_grad)
    opt = torch.optim.Adam([{"params": ps, "lr": lr * k} for k, ps in sorted(groups.items()) if ps], lr=lr)
    # linear decay to zero: the last steps settle the scales instead of moving them
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: max(0.0, 1 - i / max(steps, 1)))
    start, history = _load(ckpt_dir, model, opt, sched)
    seqs = seqs.to(next(model.parameters()).device)
    teacher_out = _teacher_cache(teacher, seqs, repeats=steps * batch > len(seqs), hidden=hidden > 0)
    model.train(False)   # no dropout: the codes are fixed, only the scales learn
    t0 = time.time() - history.get("seconds", 0.0)
    # a run killed after its last checkpoint (while the file was written or checked) skips the loop
    for step in range(start, steps):
        rows = torch.arange(step * batch, (step + 1) * batch) % len(seqs)
        t_logits, t_states = teacher_out(rows)
        out = model(seqs[rows], output_hidden_states=hidden > 0)
        kl = kl_loss(t_logits, out.logits)
        loss = kl + hidden * hidden_loss(out.hidden_states[1:], t_states) if hidden > 0 else kl
        if not math.isfinite(loss.item()):
            raise UserError(f"quantization-aware distillation diverged at step {step} (loss {loss.item()}); "
                            f"lower qad.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(round(kl.item(), 5))
        history["seconds"] = time.time() - t0
        if log:
            log(step + 1, steps, kl.item())
        if (step + 1) % every == 0 or step + 1 == steps:
            _save(ckpt_dir, step + 1, model, opt, sched, history)
    return history | {"steps": steps}


def _teacher_cache(teacher, seqs: torch.Tensor, repeats: bool, hidden: bool = False, budget: float = CACHE_BYTES):
    """rows -> (the teacher's logits for those sequences, its hidden states after each layer or
    None), each computed once when the steps cycle over them (`repeats`) and they all fit in
    `budget` bytes, else every time. Kept in float16, the logits minus their maximum: exact to
    1e-3 where the probability mass is, half of float32."""
    cache: dict[int, tuple] = {}
    c = teacher.config
    width = c.vocab_size + (c.num_hidden_layers * c.hidden_size if hidden else 0)
    keep = repeats and seqs.numel() * width * 2 <= budget

    def run(r: int) -> tuple:
        with torch.inference_mode():
            o = teacher(seqs[r:r + 1], output_hidden_states=hidden)
        z = o.logits[0].float()
        states = [h[0].half() for h in o.hidden_states[1:]] if hidden else None
        return (z - z.amax(-1, keepdim=True)).half(), states

    def outputs(rows: torch.Tensor) -> tuple:
        got = []
        for r in rows.tolist():
            if r not in cache:
                o = run(r)
                if not keep:
                    got.append(o)
                    continue
                cache[r] = o
            got.append(cache[r])
        logits = torch.stack([z for z, _ in got]).float()
        states = [torch.stack(layer) for layer in zip(*(s for _, s in got))] if hidden else None
        return logits, states
    return outputs


def _trained(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _save(ckpt_dir: Path, step: int, model, opt, sched, history: dict) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / "checkpoint.pt.tmp"
    torch.save({"step": step, "params": _trained(model), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "history": history}, tmp)
    os.replace(tmp, ckpt_dir / "checkpoint.pt")   # atomic: a kill leaves the previous one intact


def _load(ckpt_dir: Path, model, opt, sched) -> tuple[int, dict]:
    path = ckpt_dir / "checkpoint.pt"
    if not path.is_file():
        return 0, {"loss": [], "seconds": 0.0}
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")   # copy_ puts it on the model's device
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to restart tuning") from None
    named = dict(model.named_parameters())
    for k, v in state["params"].items():
        named[k].data.copy_(v)
    try:
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    except (ValueError, KeyError) as e:
        raise UserError(f"checkpoint {path} was written for other trained parameters ({e}); "
                        f"delete it to restart tuning") from None
    return state["step"], state["history"]
