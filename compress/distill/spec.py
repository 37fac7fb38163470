"""The `distill.loss` spec: which loss terms, with which weights (torch-free, read by config checks).

    distill.loss="fkl:0.9,ce:0.1"          # forward KL at temperature T, plus CE on the data
    distill.loss="jsd:1" distill.beta=0.5  # generalized JSD (GKD)
    distill.loss="topk:0.9,ce:0.1"         # sparse KL on the teacher's top-k with the tail mass
    distill.loss="fkl:1,hidden_cos:0.5"    # plus last-hidden-state alignment (learned projection)

Unset, the loss is "fkl:alpha,ce:1-alpha" with alpha = distill.alpha (0.9) and its schedule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UserError, closest


@dataclass(frozen=True)
class Term:
    """One loss term. `fn` names its function in losses.py (a name, not the function: this module
    stays torch-free for config checks); kd.py calls it with the arguments `teacher` implies.

    teacher: what it reads from the teacher, which also fixes the arguments:
      "dist"   a full distribution: fn(s_logp, t_logp[, beta]) on [c, V] log-probs at temperature T
      "topk"   top-k log-probs (live or from the cache): fn(s_logp [c, V], t_idx [c, K], t_logp [c, K]) at T=1
      "hidden" its last hidden state: fn(h_s [N, H_t] projected, h_t [N, H_t]), once over all tokens
      None     nothing, the data's next token: fn(logits [c, V], labels [c])
    tempered: scaled by T^2 (Hinton et al.: keeps the gradient's scale independent of T); topk uses
    the teacher's T=1 log-probs, which is what the cache holds.
    beta: also takes distill.beta.
    """
    fn: str
    teacher: str | None
    tempered: bool = False
    beta: bool = False


TERMS = {
    "fkl": Term("forward_kl", "dist", tempered=True),
    "rkl": Term("reverse_kl", "dist", tempered=True),
    "jsd": Term("generalized_jsd", "dist", tempered=True, beta=True),
    "tvd": Term("tvd", "dist", tempered=True),
    "topk": Term("topk_kl", "topk"),
    "ce": Term("token_ce", None),
    "hidden_mse": Term("hidden_mse", "hidden"),
    "hidden_cos": Term("hidden_cos", "hidden"),
}
DEFAULT_ALPHA = 0.9


def parse_loss(spec: str | None, alpha: float | None = None) -> dict[str, float]:
    """'fkl:0.9,ce:0.1' -> {'fkl': 0.9, 'ce': 0.1}; a bare name weighs 1; None -> the alpha mix."""
    if spec is None:
        a = DEFAULT_ALPHA if alpha is None else alpha
        return {"fkl": a, "ce": 1 - a}
    terms: dict[str, float] = {}
    for part in str(spec).split(","):
        name, _, weight = part.strip().partition(":")
        name = name.strip()
        if name not in TERMS:
            raise UserError(f"distill.loss names an unknown term '{name}'{closest(name, list(TERMS))}; "
                            f"terms: {', '.join(TERMS)}, e.g. distill.loss=fkl:0.9,ce:0.1")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise UserError(f"distill.loss weight '{weight}' of {name} is not a number; write name:weight, "
                            f"e.g. distill.loss=fkl:0.9,ce:0.1") from None
        if not w >= 0 or w == float("inf"):
            raise UserError(f"distill.loss weight of {name} is {w}; weights must be finite and >= 0")
        if name in terms:
            raise UserError(f"distill.loss lists {name} twice; give each term once")
        terms[name] = w
    if not any(terms.values()):
        raise UserError("distill.loss has no term with a positive weight; e.g. distill.loss=fkl:0.9,ce:0.1")
    return terms


def parse_cache(spec: str | None) -> int | None:
    """distill.teacher_cache='topk:K' -> K (None: no cache)."""
    if spec is None:
        return None
    kind, _, k = str(spec).partition(":")
    if kind != "topk" or not k.strip().isdigit():
        raise UserError(f"distill.teacher_cache={spec} is not understood; write topk:K, e.g. distill.teacher_cache=topk:32")
    return int(k)


def check(d) -> None:
    """Consistency of the distill keys (config.validate calls this)."""
    if d.loss is not None and (d.alpha is not None or d.alpha_end is not None):
        raise UserError("distill.alpha/alpha_end weigh the default loss (fkl:alpha,ce:1-alpha); with "
                        "distill.loss set, give every weight in it, e.g. distill.loss=fkl:0.9,ce:0.1")
    terms = parse_loss(d.loss, d.alpha)
    k = parse_cache(d.teacher_cache)
    if k is not None and not 1 <= k <= 1024:
        raise UserError(f"distill.teacher_cache K={k} is out of range; use 1..1024 (e.g. 32)")
    if k is not None:
        if d.loss is None:
            raise UserError("distill.teacher_cache holds only the teacher's top-k: set a loss that uses it, "
                            "e.g. distill.loss=topk:0.9,ce:0.1")
        live = [t for t in terms if TERMS[t].teacher in ("dist", "hidden") and terms[t] > 0]
        if live:
            raise UserError(f"distill.loss term(s) {', '.join(live)} need the live teacher, but "
                            f"distill.teacher_cache=topk:K keeps only its top-k: use topk and ce with a cache")
    if d.mode == "seqkd" and (d.loss is not None or k is not None or d.teachers):
        raise UserError("distill.mode=seqkd trains on the teacher's text with CE: leave distill.loss, "
                        "distill.teacher_cache and distill.teachers unset")
    world = int(os.environ.get("WORLD_SIZE", "1"))   # set by torchrun
    if d.parallel == "fsdp" and d.batch % world:
        raise UserError(f"distill.parallel=fsdp needs distill.batch ({d.batch}) divisible by the {world} processes, "
                        f"so every rank runs the same micro-batches; use distill.batch={world * max(1, d.batch // world)}")
    if d.parallel == "fsdp" and d.mode == "onpolicy":
        raise UserError("distill.mode=onpolicy samples from the whole student on each rank: use distill.parallel=ddp")
    n = 1 + len(d.teachers or [])
    if d.teacher_weights is not None:
        w = d.teacher_weights
        if len(w) != n or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or not sum(w) > 0:
            raise UserError(f"distill.teacher_weights={w} must list {n} non-negative numbers (teacher= first, "
                            f"then distill.teachers), not all zero")
