"""The `distill.loss` spec: which loss terms, with which weights (torch-free, read by config checks).

    distill.loss="fkl:0.9,ce:0.1"          # forward KL at temperature T, plus CE on the data
    distill.loss="jsd:1" distill.beta=0.5  # generalized JSD (GKD)
    distill.loss="topk:0.9,ce:0.1"         # sparse KL on the teacher's top-k with the tail mass
    distill.loss="fkl:1,hidden_cos:0.5"    # plus last-hidden-state alignment (learned projection)

Unset, the loss is "fkl:alpha,ce:1-alpha" with alpha = distill.alpha (0.9) and its schedule.
"""
from __future__ import annotations

import os

from ..errors import UserError, closest

# term -> what it needs from the teacher: "dist" a full distribution, "topk" top-k log-probs
# (live or from the cache), "hidden" its last hidden state, None nothing (data CE).
TERMS = {"fkl": "dist", "rkl": "dist", "jsd": "dist", "tvd": "dist", "topk": "topk",
         "ce": None, "hidden_mse": "hidden", "hidden_cos": "hidden"}
# Terms computed on tempered distributions and scaled by T^2 (Hinton et al.: keeps the gradient's
# scale independent of T). topk uses the teacher's T=1 log-probs (that is what the cache holds).
TEMPERED = ("fkl", "rkl", "jsd", "tvd")
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
    for name, value in (("top_k", d.top_k), ("teacher_cache K", k)):
        if value is not None and not 1 <= value <= 1024:
            raise UserError(f"distill.{name}={value} is out of range; use 1..1024 (e.g. 32)")
    if k is not None:
        if d.loss is None:
            raise UserError("distill.teacher_cache holds only the teacher's top-k: set a loss that uses it, "
                            "e.g. distill.loss=topk:0.9,ce:0.1")
        live = [t for t in terms if TERMS[t] in ("dist", "hidden") and terms[t] > 0]
        if live:
            raise UserError(f"distill.loss term(s) {', '.join(live)} need the live teacher, but "
                            f"distill.teacher_cache=topk:K keeps only its top-k: use topk and ce with a cache")
    modes, verifiers = ("logits", "seqkd", "onpolicy"), ("exact", "format", "none")
    if d.mode not in modes:
        raise UserError(f"distill.mode='{d.mode}'{closest(d.mode, list(modes))}; use {', '.join(modes)}")
    if d.verifier not in verifiers:
        raise UserError(f"distill.verifier='{d.verifier}'{closest(d.verifier, list(verifiers))}; use {', '.join(verifiers)}")
    if d.mode == "seqkd" and (d.loss is not None or k is not None or d.teachers):
        raise UserError("distill.mode=seqkd trains on the teacher's text with CE: leave distill.loss, "
                        "distill.teacher_cache and distill.teachers unset")
    if d.parallel not in ("ddp", "fsdp"):
        raise UserError(f"distill.parallel='{d.parallel}'{closest(d.parallel, ['ddp', 'fsdp'])}; use ddp or fsdp")
    world = int(os.environ.get("WORLD_SIZE", "1"))   # set by torchrun
    if d.parallel == "fsdp" and d.batch % world:
        raise UserError(f"distill.parallel=fsdp needs distill.batch ({d.batch}) divisible by the {world} processes, "
                        f"so every rank runs the same micro-batches; use distill.batch={world * max(1, d.batch // world)}")
    if d.parallel == "fsdp" and d.mode == "onpolicy":
        raise UserError("distill.mode=onpolicy samples from the whole student on each rank: use distill.parallel=ddp")
    if d.samples < 1 or d.max_words < 1 or not 0.0 <= d.lmbda <= 1.0:
        raise UserError("distill.samples and distill.max_words must be >= 1 and distill.lmbda in [0, 1]")
    if not 0.0 <= d.beta <= 1.0:
        raise UserError(f"distill.beta={d.beta} must be in [0, 1] (0: forward KL, 1: reverse KL)")
    if d.chunk < 1:
        raise UserError("distill.chunk must be >= 1 (tokens per chunk of the memory-efficient loss, e.g. 1024)")
    n = 1 + len(d.teachers or [])
    if d.teacher_weights is not None:
        w = d.teacher_weights
        if len(w) != n or not all(isinstance(x, (int, float)) and x >= 0 for x in w) or not sum(w) > 0:
            raise UserError(f"distill.teacher_weights={w} must list {n} non-negative numbers (teacher= first, "
                            f"then distill.teachers), not all zero")
