"""Prune targets -> the sizes to keep: explicit prune.layers/mlp/heads/hidden, or prune.params solved.

    t = Dims.of(model.config)
    want = resolve(cfg.prune, t)        # Dims with layers/hidden/heads/kv_heads/mlp to keep

The rule for prune.params (a fraction of the teacher's non-embedding parameters, or an absolute
total like 60M): depth, hidden width and any explicitly set kind stay as given; the MLP shrinks
first (it holds about 3/4 of a Llama layer's weights and, per Minitron, costs the least to prune)
but not below a quarter of its width; past that, attention loses one KV group (with its query
heads) at a time and the MLP is re-solved (down to one group with whatever MLP still fits).
Widths are rounded down to prune.multiple. Qwen2 keeps its heads unless they are set with
prune.hidden: llama.cpp's qwen2 needs hidden = heads x head_dim.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import UserError

MLP_FLOOR = 0.25        # the solver keeps at least this fraction of the MLP before cutting heads


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    mlp: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool      # Qwen2 always; Llama when attention_bias
    o_bias: bool        # Llama when attention_bias
    mlp_bias: bool
    qk_norm: bool = False   # Qwen3: a [head_dim] RMSNorm weight each for q and k per layer
    norms: int = 2          # [hidden] RMSNorm weights per layer (Gemma 3: 4)
    arch: str = "llama"

    @classmethod
    def of(cls, c) -> "Dims":
        from ..archs import arch_of
        a = arch_of(c.model_type)
        attn_bias = bool(getattr(c, "attention_bias", False))
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=c.num_attention_heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                   mlp=c.intermediate_size,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   vocab=c.vocab_size, tied=bool(getattr(c, "tie_word_embeddings", False)),
                   qkv_bias=a.qkv_bias or attn_bias, o_bias=not a.qkv_bias and attn_bias,
                   mlp_bias=not a.qkv_bias and bool(getattr(c, "mlp_bias", False)), qk_norm=a.qk_norm,
                   norms=a.layer_norms,
                   arch=c.model_type)

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads // self.kv_heads

    def layer_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + self.qkv_bias * (q + 2 * kv) + self.o_bias * h
        mlp = 3 * h * self.mlp + self.mlp_bias * (2 * self.mlp + h)
        return attn + mlp + self.norms * h + self.qk_norm * 2 * self.head_dim   # + the RMSNorm weights

    def embedding(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def non_embedding(self) -> int:
        return self.layers * self.layer_params() + self.hidden     # + the final norm

    def total(self) -> int:
        return self.non_embedding() + self.embedding()

    def summary(self) -> dict:
        return {"layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "mlp": self.mlp, "head_dim": self.head_dim,
                "params": self.total(), "non_embedding_params": self.non_embedding()}


def valid_heads(t: Dims) -> list[int]:
    """Head counts that keep whole KV groups: multiples of the group size."""
    return [k * t.group for k in range(1, t.kv_heads + 1)]


def round_down(x: int, multiple: int, cap: int) -> int:
    """x rounded down to a multiple (at least one multiple), never above the teacher's `cap`."""
    return cap if x >= cap else min(cap, max(multiple, x // multiple * multiple))


def parse_params(spec, teacher: Dims) -> tuple[str, float]:
    """'0.5' / 0.5 -> ('fraction', 0.5); '60M' / '1.2B' / 60000000 -> ('absolute', 6e7)."""
    text = str(spec).strip().upper().replace("_", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([KMB]?)", text)
    if not m:
        raise UserError(f"prune.params={spec} is not a fraction like 0.5 or a count like 60M; "
                        f"give one of those")
    value = float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)]
    if not m.group(2) and value < 1:
        if value <= 0:
            raise UserError(f"prune.params={spec} must be above 0; e.g. prune.params=0.5")
        return "fraction", value
    if value >= teacher.total():
        raise UserError(f"prune.params={spec} is not below the teacher's {teacher.total() / 1e6:.1f}M parameters; "
                        f"ask for fewer (e.g. prune.params=0.5 for half its non-embedding parameters)")
    return "absolute", value


def check_explicit(p, t: Dims) -> None:
    for key, have in (("layers", t.layers), ("mlp", t.mlp), ("hidden", t.hidden), ("heads", t.heads)):
        want = getattr(p, key)
        if want is not None and not 1 <= int(want) <= have:
            raise UserError(f"prune.{key}={want} is outside the teacher's 1..{have}; pick a value in that range")
    if p.heads is not None and int(p.heads) not in valid_heads(t):
        raise UserError(f"prune.heads={p.heads} breaks GQA grouping ({t.heads} query heads share {t.kv_heads} "
                        f"KV heads, {t.group} per group); valid: {', '.join(map(str, valid_heads(t)))}")
    if int(p.multiple) < 1:
        raise UserError(f"prune.multiple={p.multiple} must be at least 1 (e.g. 32, or 256 for GGUF k-quants)")


def explicit(p, t: Dims) -> Dims:
    """The teacher's sizes with every explicitly set target applied (widths rounded down)."""
    check_explicit(p, t)
    m = int(p.multiple)
    d = t
    if p.layers is not None:
        d = replace(d, layers=int(p.layers))
    if p.hidden is not None:
        d = replace(d, hidden=round_down(int(p.hidden), m, t.hidden))
    if p.mlp is not None:
        d = replace(d, mlp=round_down(int(p.mlp), m, t.mlp))
    if p.heads is not None:
        d = replace(d, heads=int(p.heads), kv_heads=int(p.heads) // t.group)
    check_export(d, t)
    return d


def q_is_hidden(d: Dims) -> bool:
    from ..archs import ARCHS
    return d.arch in ARCHS and ARCHS[d.arch].q_is_hidden


def check_export(d: Dims, t: Dims) -> None:
    """llama.cpp's graph for some families (qwen2) takes attn_q as [hidden, hidden]: there hidden
    must stay heads x head_dim."""
    if q_is_hidden(d) and (d.hidden, d.heads) != (t.hidden, t.heads) and d.hidden != d.heads * d.head_dim:
        raise UserError(f"{d.arch} models run in llama.cpp only with hidden size = heads x head_dim ({d.head_dim}); "
                        f"prune.heads={d.heads} needs prune.hidden={d.heads * d.head_dim}: set both, or neither")


def resolve(p, t: Dims) -> tuple[Dims, dict]:
    """(sizes to keep, how they were chosen) for the prune config `p` and teacher sizes `t`."""
    base = explicit(p, t)
    if p.params is None:
        return base, {"rule": "explicit"}
    if p.mlp is not None:
        raise UserError("prune.params and prune.mlp were both set; the solver sizes the MLP for prune.params: "
                        "drop one of them")
    kind, value = parse_params(p.params, t)
    budget = int(value * t.non_embedding()) if kind == "fraction" else int(value) - base.embedding()
    info = {"rule": "mlp first (>= 1/4), then whole KV groups", "target": str(p.params),
            "target_non_embedding": budget}
    if budget <= 0:
        raise UserError(f"prune.params={p.params} is below the embedding's {base.embedding() / 1e6:.1f}M "
                        f"parameters; ask for more or also set prune.hidden lower")
    if base.non_embedding() <= budget:
        return base, info                       # explicit targets already meet it
    fixed_heads = p.heads is not None or q_is_hidden(t)     # see check_export
    groups = [base.kv_heads] if fixed_heads else range(base.kv_heads, 0, -1)
    m = int(p.multiple)
    fits = []                                   # most heads first, each with the widest MLP that fits
    for g in groups:
        d = replace(base, kv_heads=g, heads=g * t.group)
        if (mlp := _mlp_fit(d, budget, m)) > 0:
            fits.append(replace(d, mlp=mlp))
    floor = max(1, int(MLP_FLOOR * t.mlp))
    pick = next((d for d in fits if d.mlp >= floor), fits[-1] if fits else None)
    if pick is None:
        raise UserError(f"prune.params={p.params} cannot be met by pruning MLP and heads alone; "
                        f"also set prune.layers (fewer layers) or prune.hidden")
    return pick, info


def _mlp_fit(d: Dims, budget: int, multiple: int) -> int:
    """Largest MLP width (a multiple, <= the current) with non-embedding params <= budget; 0 if none."""
    fixed = replace(d, mlp=0).non_embedding()
    per_unit = d.layers * (3 * d.hidden + 2 * d.mlp_bias)     # params per MLP channel, all layers
    units = max(0, budget - fixed) // per_unit
    if multiple <= d.mlp:
        units = units // multiple * multiple
    return min(d.mlp, units)
