"""The best GGUF at a given size: a quantization type per tensor, chosen from measured sensitivity.

    from compress.quantize import mix
    art = mix.run(cfg, f16, run_dir / "gguf-auto", qtype="auto:120MB", imatrix=im, sensitivity=s)
    # -> gguf-auto/model.gguf (at most 120 MB) + Modelfile + quantize.log; meta: the type of every tensor

quantize.gguf takes `auto` (the profile's budgets.max_size_mb), `auto:<N>MB` or `auto:<P>%` (of the
unquantized GGUF) beside fixed types. The steps:
1. Candidates. Every matrix is quantized to every candidate type its width allows (k-quants need a
   multiple of 256 columns, the others 32) by ggml_quantize_chunk, the function llama.cpp's
   quantizer runs on each chunk of rows, with the same importance-matrix row: the bytes scored are
   the bytes the build writes.
2. Score. Each candidate's rounding error dW is weighed by the Fisher information the sensitivity
   stage sampled: predicted KL(F16 || candidate) = 1/2 mean_t (d_t^T dW x_t)^2. Errors of
   different tensors add up (to second order, cross-tensor terms aside), so the mix's predicted
   KLD is their sum.
3. Solve. One type per tensor minimising the summed error under the byte budget: a multiple-choice
   knapsack, solved exactly by dynamic programming over the budget in units of budget/100,000
   (sizes rounded up, so the file never exceeds the budget).
4. Build. llama.cpp quantizes the F16 with the chosen type of every tensor as an override,
   and the built file's types are checked against the choice. The KLD the mix was predicted to have
   is measured against the F16 in llama.cpp on train tokens the sensitivity stage set aside.
5. Check. The largest of llama.cpp's own types whose file fits the budget is measured on the same
   tokens, and ships instead of the mix when it loses less (meta: "shipped"), so a size target
   never gives less than llama.cpp would have at that size.
Vectors (norms) stay as the F16 stores them, as llama.cpp requires. No library picks GGUF types per
tensor under a byte budget (llama.cpp takes the overrides, not the choice), hence this module.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import artifacts
from ..errors import UserError
from ..formats import size_target
from ..stage import stage
from . import gguf as quantize_gguf
from .header import tensors_of
from .sensitivity import lookup_factors, samples_of

OUT_FILE = "model.gguf"
# Best first. F16 is kept for budgets above Q8_0. IQ4_NL (4.5 bits, like Q4_0) is left out: with an
# importance matrix ggml quantizes it about twice as slowly as Q4_1 and ten times as slowly as Q4_0.
CANDIDATES = ("F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K")
# llama_ftype whose name the file carries (general.file_type) for a mix led by each type.
FTYPE_OF = {"F16": "Q8_0", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K": "Q5_K_M", "Q5_1": "Q5_0", "Q5_0": "Q5_0",
            "Q4_K": "Q4_K_M", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "Q3_K": "Q3_K_M", "Q2_K": "Q2_K"}
UNITS = 100_000   # knapsack resolution: the budget in this many steps
TALL = 8192       # a matrix with more rows (a vocabulary) is scored on the rows that matter (score_rows)
UNSEEN = 0.1      # share of embedding lookups given to tokens at random rather than as calibration saw them


def is_auto(qtype) -> bool:
    return size_target(qtype) is not None


def artifact_name(qtype: str) -> str:
    """'auto' -> 'gguf-auto'; 'auto:80MB' -> 'gguf-auto-80MB'; 'auto:30%' -> 'gguf-auto-30pct'."""
    return "gguf-" + str(qtype).replace(":", "-").replace("%", "pct")


def _reads(cfg) -> tuple:
    return ("budgets.max_size_mb",) if "auto" in map(str, cfg.quantize.gguf) else ()


@dataclass
class Tensor:
    name: str
    rows: int
    cols: int


@dataclass
class Option:
    type: str
    bytes: int
    vec: np.ndarray      # per sampled token, the first-order change of log p it makes (zeros: none)
    lookup: float = 0.0  # the embedding lookups' diagonal term

    @property
    def err(self) -> float:
        """2 x the predicted KL of this tensor's rounding alone."""
        return float(np.mean(np.square(self.vec))) + self.lookup


@stage("quantize", inputs=("imatrix", "sensitivity"), params=("qtype",), reads=_reads, format="gguf")
def run(cfg, src, out, *, qtype: str, imatrix=None, sensitivity=None) -> artifacts.Artifact:
    """F16 GGUF artifact `src` -> the GGUF mix with the least predicted KLD at `qtype`'s size."""
    if sensitivity is None:
        raise UserError(f"quantize.gguf={qtype} needs the sensitivity stage's statistics")
    budget_mb = budget_of(qtype, src, cfg)
    matrix = dict(np.load(imatrix.file)) if imatrix is not None else None
    stats = dict(np.load(sensitivity.file))
    stored = tensors_of(src.file)
    tensors = [Tensor(name, t.rows, t.cols) for name, t in stored.items()]
    # Bytes the choice does not change: header, metadata, vectors; and each matrix's worst alignment padding.
    fixed = Path(src.file).stat().st_size - sum(t.data.nbytes for t in stored.values()) + 32 * len(stored)
    budget = int(budget_mb * 1e6) - fixed
    allowed = {t.name: allowed_types(t.cols) for t in tensors}
    smallest = sum(min(type_bytes(k, t.rows, t.cols) for k in allowed[t.name]) for t in tensors)
    if smallest > budget:
        raise UserError(f"quantize.gguf={qtype}: {budget_mb:.1f} MB is below the smallest mix of this model, "
                        f"{(smallest + fixed) / 1e6:.1f} MB; give a larger size target")
    with artifacts.writing(out, quant=f"auto:{budget_mb:g}MB", file=OUT_FILE) as (tmp, meta):
        t0 = time.time()
        options = measure(src.file, tensors, allowed, stats, matrix)
        t1 = time.time()
        try:
            opts = [options[t.name] for t in tensors]
            picks = refine(opts, solve([[(o.bytes, o.err) for o in os_] for os_ in opts], budget), budget)
        except Infeasible as e:
            raise UserError(f"quantize.gguf={qtype}: no mix of the types llama.cpp allows fits {budget_mb:.1f} MB "
                            f"({e}); give a larger size target") from None
        chosen = {t.name: options[t.name][k].type for t, k in zip(tensors, picks)}
        predicted = 0.5 * objective([options[t.name][k] for t, k in zip(tensors, picks)])
        built = build(Path(src.file), tmp / OUT_FILE, tensors, chosen, matrix)
        ids = stats.get("check_ids")
        ref = logprobs(Path(src.file), ids)
        mix_kld = kld_to(ref, tmp / OUT_FILE, ids)
        # The prediction can miss (see sensitivity.py); llama.cpp's own type of the largest size that
        # fits is measured on the same check tokens, and ships instead when it loses less.
        uniform = best_uniform(Path(src.file), int(budget_mb * 1e6), sum(t.rows * t.cols for t in tensors),
                               fixed, matrix, tmp) if ref is not None else None
        shipped = "mix"
        if uniform is not None:
            u_type, u_path = uniform
            u_kld = kld_to(ref, u_path, ids)
            uniform = {"type": u_type, "size_mb": round(u_path.stat().st_size / 1e6, 3), "measured_kld": u_kld}
            if u_kld < mix_kld:
                u_path.replace(tmp / OUT_FILE)
                (tmp / f"uniform-{u_type}.log").replace(tmp / "quantize.log")
                built, shipped = tensor_types_2d(tmp / OUT_FILE), u_type
        for leftover in tmp.glob("uniform-*"):
            leftover.unlink()
        size = (tmp / OUT_FILE).stat().st_size
        counts: dict[str, int] = {}
        for k in built.values():
            counts[k] = counts.get(k, 0) + 1
        quantize_gguf.modelfile(src, tmp)
        meta["params"] = src.meta.get("params")
        meta["metrics"] = {
            "budget_mb": budget_mb, "size_mb": round(size / 1e6, 3), "tensor_types": counts, "tensors": built,
            "shipped": shipped, "imatrix": imatrix is not None, "predicted_kld": predicted,
            "measured_kld": mix_kld, "uniform": uniform, "check_tokens": int(len(ids)) if ids is not None else 0,
            "predicted_kld_uniform": uniform_predictions(tensors, options),
            "seconds": {"candidates": round(t1 - t0, 1), "solve_build": round(time.time() - t1, 1)}}
    return artifacts.load(out)


def build(src: Path, dst: Path, tensors: list[Tensor], chosen: dict[str, str], matrix) -> dict[str, str]:
    """llama.cpp quantizes `src` with every matrix's chosen type; returns the types the file holds."""
    # general.file_type names the type holding the most bytes (llama.cpp prints it when loading)
    lead = max(CANDIDATES, key=lambda k: sum(type_bytes(k, t.rows, t.cols) for t in tensors if chosen[t.name] == k))
    quantize_gguf.quantize(src, dst, FTYPE_OF[lead], matrix, dst.parent / "quantize.log", overrides=chosen)
    built = tensor_types_2d(dst)
    wrong = {n: (k, built.get(n)) for n, k in chosen.items() if built.get(n) != k}
    if wrong:
        raise RuntimeError(f"llama.cpp did not build the chosen types (chosen, built): {wrong}")
    return built


def budget_of(qtype: str, src, cfg) -> float:
    """The size target in MB (1e6 bytes) of the whole file."""
    target = size_target(qtype)
    if target is None:
        raise UserError(f"{qtype} is not a size target; write auto (budgets.max_size_mb), auto:80MB or auto:30%")
    value, unit = target
    if value is None:
        if cfg.budgets.max_size_mb is None:
            raise UserError("quantize.gguf=auto sizes the mix to budgets.max_size_mb, which is not set; "
                            "set it or write auto:80MB")
        return float(cfg.budgets.max_size_mb)
    return value / 100 * Path(src.file).stat().st_size / 1e6 if unit == "%" else value


# ---------------------------------------------------------------- candidates

def allowed_types(cols: int, candidates=CANDIDATES) -> list[str]:
    """The candidate types a matrix with `cols` columns can be stored in (rows are quantized in blocks)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    return [k for k in candidates if cols % GGML_QUANT_SIZES[GGMLQuantizationType[k]][0] == 0]


def type_bytes(qtype: str, rows: int, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return rows * (cols // block) * size


def measure(src: Path, tensors: list[Tensor], allowed: dict, stats: dict, matrix) -> dict:
    """{tensor: [Option]} for every type its width allows.

    Each candidate is made by ggml_quantize_chunk, the function llama.cpp's quantizer calls for every
    chunk of rows (with the same importance-matrix row), so the bytes scored are the bytes the build
    writes. Its error dW costs mean_t (d_t^T dW x_t)^2 over the sensitivity stage's sampled tokens
    (the Fisher quadratic form), plus the diagonal lookup term for an embedding table.
    """
    from concurrent.futures import ThreadPoolExecutor
    from gguf.quants import dequantize
    ref = tensors_of(src)
    n_tokens = next(len(v) for k, v in stats.items() if k.startswith("x/") and not k.endswith(":scale"))
    options: dict[str, list] = {}
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:   # ggml and numpy release the GIL
        for t in tensors:
            samples, lookup = samples_of(stats, t.name), lookup_factors(stats, t.name)
            if samples is None and lookup is None:
                raise UserError(f"the sensitivity statistics have no entry for {t.name}; re-run stages=[sensitivity]")
            idx, lookup_w = score_rows(t.rows, samples, lookup)
            w = dequantize(ref[t.name].data[idx], gguf_type(ref[t.name].type)).astype(np.float32)
            x, d = samples if samples is not None else (None, None)
            d = d[:, idx] if d is not None else None
            im = matrix.get(t.name) if matrix else None

            def score(k, t=t, w=w, im=im, x=x, d=d, lookup=lookup, lookup_w=lookup_w):
                q = w.astype(np.float16).astype(np.float32) if k == "F16" else \
                    dequantize(ggml_quantize(w, k, im), gguf_type(k)).astype(np.float32)
                dw = q - w
                # each sampled token's first-order change of log p: d_t^T dW x_t
                vec = ((x @ dw.T) * d).sum(1).astype(np.float64) if x is not None else np.zeros(n_tokens)
                look = float(lookup_w @ (np.square(dw) @ lookup[1]).astype(np.float64)) if lookup is not None else 0.0
                return Option(k, type_bytes(k, t.rows, t.cols), vec, look)
            options[t.name] = list(pool.map(score, allowed[t.name]))
    return options


def score_rows(rows: int, samples, lookup, top: int = 2048, spread: int = 1024, seed: int = 0):
    """(rows to score, each one's weight in the lookup term) for a matrix.

    All rows, unless there are more than TALL (a vocabulary): then the rows holding nearly all the
    sampled output gradients (top: 99.99 % on SmolLM2's 49k vocabulary), the rows calibration looked
    up, and `spread` rows at random that stand for the lookups of tokens calibration did not see.
    """
    freq = lookup[0].astype(np.float64) if lookup is not None else np.zeros(rows)
    if rows <= TALL:
        return np.arange(rows), (1 - UNSEEN) * freq + UNSEEN / rows
    picked = [np.flatnonzero(freq)]
    if samples is not None:
        energy = np.square(samples[1], dtype=np.float64).sum(0)
        picked.append(np.argsort(energy)[-top:])
    spread_rows = np.random.default_rng(seed).choice(rows, size=min(spread, rows), replace=False)
    idx = np.unique(np.concatenate([*picked, spread_rows]))
    weight = (1 - UNSEEN) * freq[idx] + np.isin(idx, spread_rows) * UNSEEN / len(spread_rows)
    return idx, weight


def ggml_quantize(rows: np.ndarray, qtype: str, imatrix: np.ndarray | None) -> np.ndarray:
    """float32 [n, cols] -> the type's blocks, uint8 [n, row bytes], by llama.cpp's own ggml."""
    lib = _ggml()
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n, cols = rows.shape
    out = np.empty((n, type_bytes(qtype, 1, cols)), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(int(gguf_type(qtype)), rows.ctypes.data, out.ctypes.data, 0, n, cols,
                            None if im is None else im.ctypes.data)
    return out


_LIB = None


def _ggml():
    """llama-cpp-python's bundled ggml: the library its llama.cpp quantizes with."""
    import ctypes
    global _LIB
    if _LIB is None:
        import llama_cpp
        lib_dir = Path(llama_cpp.__file__).parent / "lib"
        path = next((p for p in sorted(lib_dir.glob("*ggml-base*"))), None)
        if path is None:
            raise UserError(f"llama-cpp-python's ggml library is missing from {lib_dir}; reinstall llama-cpp-python")
        lib = ctypes.CDLL(str(path))
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        _LIB = lib
    return _LIB


def gguf_type(name: str):
    from gguf import GGMLQuantizationType
    return GGMLQuantizationType[name]


# llama.cpp's own fallback for a width a k-quant cannot store (llama-quant.cpp, tensor_type_fallback).
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def uniform_predictions(tensors: list[Tensor], options: dict) -> dict:
    """Predicted KLD of each candidate type given to every matrix (with llama.cpp's fallbacks)."""
    out = {}
    for k in CANDIDATES:
        picked = []
        for t in tensors:
            by_type = {o.type: o for o in options[t.name]}
            picked.append(by_type.get(k) or by_type.get(FALLBACK.get(k)) or by_type.get("F16") or options[t.name][0])
        out[k] = 0.5 * objective(picked)
    return out


# ---------------------------------------------------------------- the choice

class Infeasible(ValueError):
    pass


def solve(options: list[list[tuple[int, float]]], budget: int, units: int = UNITS) -> list[int]:
    """Pick one (bytes, error) option per item minimising total error with total bytes <= budget.

    Dynamic programming over the budget in `units` steps; item sizes are rounded up to whole steps,
    so the answer always fits and is exact when sizes are multiples of the step (budget <= units).
    """
    if any(not o for o in options):
        raise ValueError("every item needs at least one option")
    smallest = sum(min(b for b, _ in o) for o in options)
    if smallest > budget:
        raise Infeasible(f"the smallest choice takes {smallest} bytes, above the budget of {budget}")
    unit = max(1, math.ceil(budget / units))
    cap = budget // unit
    best = np.zeros(cap + 1)           # least error over the items so far, within c units
    choice = np.zeros((len(options), cap + 1), dtype=np.int16)
    for i, opts in enumerate(options):
        new = np.full(cap + 1, np.inf)
        for k, (b, e) in enumerate(opts):
            w = -(-b // unit)
            if w > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[w:] = best[:cap + 1 - w] + e
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = k
        best = new
    if not np.isfinite(best[cap]):
        raise Infeasible(f"no choice fits {budget} bytes at a step of {unit} bytes")
    picks, c = [0] * len(options), cap
    for i in range(len(options) - 1, -1, -1):
        k = int(choice[i, c])
        picks[i] = k
        c -= -(-options[i][k][0] // unit)
    return picks


def objective(chosen: list[Option]) -> float:
    """2 x predicted KL of a whole mix: the tensors' first-order changes of log p add up per token
    before they are squared, so errors that push the same way (rounding that undoes the same
    training update everywhere) count together; the embedding lookups' diagonal terms add."""
    return float(np.mean(np.square(np.sum([o.vec for o in chosen], axis=0)))) + sum(o.lookup for o in chosen)


def refine(options: list[list[Option]], picks: list[int], budget: int, passes: int = 4) -> list[int]:
    """Local search from the knapsack's choice on the whole mix's objective (objective()), one tensor
    at a time, never above the budget: the knapsack sees each tensor alone and cannot see errors of
    different tensors that add up."""
    picks = list(picks)
    vec_sum = np.sum([options[i][k].vec for i, k in enumerate(picks)], axis=0)
    size = sum(options[i][k].bytes for i, k in enumerate(picks))
    for _ in range(passes):
        changed = False
        for i, opts in enumerate(options):
            cur = opts[picks[i]]
            rest = vec_sum - cur.vec

            def cost(o):
                return float(np.mean(np.square(rest + o.vec))) + o.lookup
            best_k, best = picks[i], cost(cur)
            for k, o in enumerate(opts):
                if size - cur.bytes + o.bytes <= budget and cost(o) < best * (1 - 1e-9):
                    best_k, best = k, cost(o)
            if best_k != picks[i]:
                vec_sum = rest + opts[best_k].vec
                size += opts[best_k].bytes - cur.bytes
                picks[i] = best_k
                changed = True
        if not changed:
            break
    return picks


# ---------------------------------------------------------------- the check

def logprobs(path: Path, ids) -> np.ndarray | None:
    """[T, V] log-probs of a GGUF in llama.cpp on the check tokens; None without them."""
    from ..evaluate.runtimes import LlamaCppRuntime
    if ids is None or len(ids) < 2:
        return None
    rt = LlamaCppRuntime(str(path), os.cpu_count() or 1, n_ctx=len(ids))
    try:
        return rt.logprobs([int(i) for i in ids])
    finally:
        rt.close()


def kld_to(ref, path: Path, ids) -> float | None:
    """KL(F16 || this file) per token in llama.cpp on the check tokens (train tokens the
    sensitivity stage set aside); None without them."""
    from ..evaluate.quality import kld
    return None if ref is None else kld(ref, logprobs(path, ids))


# llama.cpp's own types the mix is checked against, largest first.
UNIFORM = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q4_0", "Q2_K")


def best_uniform(src: Path, budget: int, weights: int, fixed: int, matrix, tmp: Path):
    """(type, file) of the largest of llama.cpp's own types whose file fits `budget` bytes, or None.

    Sizes are known only once quantized (widths that take no k-quant fall back to larger types), so
    a type whose nominal bits already fit is quantized and kept if the file does."""
    from ..formats import GGUF_QUANT
    for q in UNIFORM:
        if fixed + weights * GGUF_QUANT[q].bits / 8 > budget:
            continue
        path = tmp / f"uniform-{q}.gguf"
        quantize_gguf.quantize(src, path, q, matrix, tmp / f"uniform-{q}.log")
        if path.stat().st_size <= budget:
            return q, path
        path.unlink()
    return None


def tensor_types_2d(path: Path) -> dict[str, str]:
    return {name: t.type for name, t in tensors_of(path).items()}
