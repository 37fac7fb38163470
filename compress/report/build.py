"""report.json: a pure function of a run directory's meta.json files.

    from compress.report.build import build
    report = build("runs/phone-20250101-120000")
    report["recommended"], report["artifacts"][0]["quality"]["kld"]

Measured figures (quality, host speed, peak RSS) come only from eval-<artifact>/meta.json.
Device figures are estimates from the profile's device facts and are kept in their own
`estimate` block so they are never mistaken for measurements.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import shlex
from pathlib import Path

from ..artifacts import META
from ..config import Budgets, Device
from ..errors import UserError
from ..formats import FORMATS, HF_COMMAND, ORDER
from .quality import compression_rows, task_summary
from .samples import sample_section

MODEL_FORMATS = tuple(ORDER)   # artifact formats that are models (formats.py), not data or evals
MB = 1e6   # decimal megabytes, so that GB/s bandwidth and MB sizes divide without 1024s


# ---------------------------------------------------------------- reading meta files

def read_run_meta(run_dir: Path) -> dict:
    """The run's own meta.json (stage "run"); anything else is not a run directory."""
    path = Path(run_dir) / META
    hint = "pass a directory made by `compress run`, e.g. runs/<name>"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no {META}); {hint}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is corrupt ({e}); {hint}") from None
    if not isinstance(meta, dict) or meta.get("stage") != "run":
        raise UserError(f"{run_dir} is not a run directory ({META} has no stage 'run'); {hint}")
    return meta


def read_artifact_metas(run_dir: Path, warnings: list) -> dict:
    """{dir name: meta} for every finished artifact directory, in name order.

    Hidden siblings are unfinished temporaries; a corrupt meta is skipped with a warning so
    one broken directory does not hide the rest of the report.
    """
    out = {}
    for d in sorted(p for p in Path(run_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        path = d / META
        if not path.is_file():
            continue
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            warnings.append(f"{path} is corrupt and was skipped; delete {d} and re-run its stage")
            continue
        if isinstance(meta, dict):
            out[d.name] = meta
    return out


def index_evals(metas: dict, warnings: list) -> dict:
    """{artifact name: eval metrics}, dropping evals made from an older version of the artifact."""
    return index_made_from(metas, warnings, "eval", "evaluate")


def index_made_from(metas: dict, warnings: list, fmt: str, stage: str) -> dict:
    """{artifact name: metrics} of the `fmt` artifacts (eval-<name>, samples-<name>) made from the
    current version of the artifact they are about; older ones are dropped with a warning."""
    out = {}
    for name, meta in metas.items():
        if meta.get("format") != fmt and meta.get("stage") != stage:
            continue
        metrics = meta.get("metrics") or {}
        target = metrics.get("artifact") or (name[len(fmt) + 1:] if name.startswith(f"{fmt}-") else None)
        if not target or target not in metas:
            continue
        # The first parent is the artifact measured; its hash pins which version that was.
        parents = meta.get("parents") or []
        made_from = parents[0].get("hash") if parents and parents[0].get("name") == target else None
        if made_from and made_from != metas[target].get("hash"):
            warnings.append(f"{name} was made from an older version of {target} and was ignored; "
                            f"re-run the {stage} stage")
            continue
        out[target] = metrics
    return out


# ---------------------------------------------------------------- one artifact

def is_teacher(name: str, meta: dict) -> bool:
    return meta.get("stage") == "teacher" or name == "teacher"


def inherited_params(name: str, metas: dict):
    """Parameter count, walking up parents: quantizing or exporting does not change it."""
    seen = set()
    while name in metas and name not in seen:
        seen.add(name)
        params = metas[name].get("params")
        if params:
            return int(params)
        name = metas[name].get("parent")
    return None


def estimate(size_mb, params, device: dict) -> dict:
    """Device speed from device facts only; clearly an estimate, never a measurement.

    decode: each new token reads every weight once, so tok/s ~ bandwidth / weight bytes
            (KV-cache reads and compute are ignored, so this is an upper bound).
    prefill: a forward pass costs ~2 FLOPs per parameter per token, so tok/s ~ FLOP/s / (2 params).
    """
    bw, flops = device.get("bandwidth_gbs"), device.get("compute_gflops")
    decode = bw * 1e9 / (size_mb * MB) if bw and size_mb else None
    prefill = flops * 1e9 / (2 * params) if flops and params else None
    decode_basis = (f"estimate: {bw} GB/s memory bandwidth / {_round(size_mb)} MB artifact size "
                    f"(~ weight bytes read per token; ignores KV cache; upper bound)"
                    if decode else "unknown: needs device.bandwidth_gbs and the artifact size")
    prefill_basis = (f"estimate: {flops} GFLOP/s / (2 x {params} params) FLOPs per token "
                     f"(ignores attention; upper bound)"
                     if prefill else "unknown: needs device.compute_gflops and the parameter count")
    return {"device": device.get("name"), "decode_tps": _round(decode), "prefill_tps": _round(prefill),
            "basis": {"decode_tps": decode_basis, "prefill_tps": prefill_basis}}


def main_file(meta: dict, path: Path) -> Path:
    """model.gguf / model.onnx inside the artifact, or the directory itself for HF."""
    return path / meta["file"] if meta.get("file") not in (None, ".") else path


def run_commands(run_name: str, name: str, meta: dict, path: Path, threads) -> dict:
    """How to run the artifact in the runtime it ships in: its format's command templates."""
    fmt = next((f for f in FORMATS.values() if f.artifact == meta.get("format") and f.commands), None)
    if fmt is None:
        return {"python": HF_COMMAND.format(dir=str(path))}
    main, modelfile = main_file(meta, path), path / "Modelfile"
    tag = re.sub(r"[^a-z0-9._-]+", "-", f"{run_name}-{name}".lower()).strip("-.") or "model"
    values = {"main": _q(main), "main_str": str(main), "dir": str(path), "threads": threads or 4, "tag": tag,
              "modelfile": _q(modelfile)}
    out = {}
    for label, template in fmt.commands.items():
        # a Modelfile (Ollama) is written beside GGUF exports; without one there is no command
        out[label] = None if "{modelfile}" in template and not modelfile.is_file() else template.format(**values)
    if any("{modelfile}" in t for t in fmt.commands.values()):
        out["modelfile"] = str(modelfile) if modelfile.is_file() else None
    return out


def artifact_entry(run_dir: Path, run_name: str, name: str, metas: dict, ev: dict | None,
                   device: dict, threads) -> dict:
    meta = metas[name]
    ev = ev or {}
    quality, speed, memory = ev.get("quality") or {}, ev.get("speed") or {}, ev.get("memory") or {}
    size_mb = meta["size_bytes"] / MB if meta.get("size_bytes") is not None else None
    params = inherited_params(name, metas)
    path = Path(run_dir).resolve() / name
    return {
        "name": name,
        "format": meta.get("format"),
        "quant": meta.get("quant"),
        "stage": meta.get("stage"),
        "teacher": is_teacher(name, meta),
        "path": str(main_file(meta, path)),
        "parent": meta.get("parent"),
        "size_mb": _round(size_mb),
        "params": params,
        "evaluated": bool(ev),
        "runtime": ev.get("runtime"),
        "device": ev.get("device"),
        "quality": {k: quality.get(k) for k in ("ppl", "kld", "top1")}
                   | {"ood": quality.get("ood"), "tasks": copy.deepcopy(quality.get("tasks") or {})},
        "speed": {k: speed.get(k) for k in ("threads", "prefill_tps", "decode_tps", "ttft_ms")}
                 | {"load_warning": speed.get("load_warning")},
        "memory": {"peak_rss_mb": memory.get("peak_rss_mb")},
        "estimate": estimate(size_mb, params, device),
        "run": run_commands(run_name, name, meta, path, threads),
    }


# ---------------------------------------------------------------- budgets, Pareto, pick

def check_budgets(art: dict, budgets: dict) -> dict:
    """Each set budget against its figure; a budget whose figure is unknown is 'unchecked'.

    pass is True only when every set budget was checked and met, False when any failed,
    None when none failed but some could not be checked (e.g. no eval yet).
    """
    est = art["estimate"]
    checks = [  # (budget key, figure, label, unit, smaller is better)
        ("max_size_mb", art["size_mb"], "size", "MB", True),
        ("max_peak_rss_mb", art["memory"]["peak_rss_mb"], "peak RSS (measured on host)", "MB", True),
        ("min_decode_tps", est["decode_tps"], f"decode (estimated for {est['device']})", "tok/s", False),
        ("max_kld", art["quality"]["kld"], "KLD vs teacher", "nats/token", True),
    ]
    failed, unchecked, miss = [], [], 0.0
    for key, value, label, unit, lower in checks:
        limit = budgets.get(key)
        if limit is None:
            continue
        if value is None:
            unchecked.append(f"{label} unknown (budget {key}={limit})")
            miss = math.inf
            continue
        over = (value - limit) if lower else (limit - value)
        if over > 0:
            sign = ">" if lower else "<"
            failed.append(f"{label} {fmt_num(value)} {unit} {sign} {'max' if lower else 'min'} {limit:g} {unit}")
            miss += over / limit if limit else math.inf
    ok = False if failed else (None if unchecked else True)
    return {"pass": ok, "failed": failed, "unchecked": unchecked,
            "decode_figure": "estimate for the profile's device (estimate.decode_tps)",
            "miss": miss}


def mark_pareto(arts: list[dict]) -> None:
    """pareto = no other evaluated artifact is at least as small and as close, and better in one."""
    pts = [(a["size_mb"], a["quality"]["kld"]) for a in arts]
    for a, (s, k) in zip(arts, pts):
        if s is None or k is None:
            a["pareto"] = False
            continue
        a["pareto"] = not any(s2 is not None and k2 is not None and s2 <= s and k2 <= k and (s2 < s or k2 < k)
                              for s2, k2 in pts)


def recommend(arts: list[dict], budgets: dict) -> tuple[str | None, str]:
    """Best quality (lowest KLD, ties -> smaller) among non-teacher artifacts meeting every budget."""
    cands = [a for a in arts if not a["teacher"]]
    if not cands:
        return None, "no candidate artifacts besides the teacher (the teacher is the reference, never the pick)"
    ok = [a for a in cands if a["budget"]["pass"] and a["quality"]["kld"] is not None]
    set_budgets = {k: v for k, v in budgets.items() if v is not None}
    if ok:
        best = min(ok, key=lambda a: (a["quality"]["kld"], a["size_mb"] or 0.0))
        within = (f"within every budget ({', '.join(f'{k}={v:g}' for k, v in set_budgets.items())})"
                  if set_budgets else "(no budgets set)")
        return best["name"], (f"{best['name']}: lowest KLD vs teacher ({fmt_num(best['quality']['kld'])} nats/token, "
                              f"{fmt_num(best['size_mb'])} MB) among {len(ok)} evaluated candidate(s) {within}")
    if not any(a["evaluated"] for a in cands):
        return None, "no candidate has been evaluated yet; run the evaluate stage"
    near = min(cands, key=lambda a: a["budget"]["miss"])
    why = "; ".join(near["budget"]["failed"] + near["budget"]["unchecked"]) or "not evaluated"
    return None, f"no artifact meets every budget; nearest miss: {near['name']} ({why})"


# ---------------------------------------------------------------- the report

def build(run_dir) -> dict:
    """report.json content for runs/<name>/ (see the module docstring)."""
    run_dir = Path(run_dir)
    run_meta = read_run_meta(run_dir)
    config = run_meta.get("config") or {}
    # Defaults fill keys an older run's config lacks, so old runs still report.
    device = dataclasses.asdict(Device()) | (config.get("device") or {})
    budgets = dataclasses.asdict(Budgets()) | (config.get("budgets") or {})
    run_name = run_meta.get("name") or run_dir.name
    warnings: list[str] = []
    metas = read_artifact_metas(run_dir, warnings)
    evals = index_evals(metas, warnings)
    names = [n for n, m in metas.items() if m.get("format") in MODEL_FORMATS]
    arts = [artifact_entry(run_dir, run_name, n, metas, evals.get(n), device, device.get("threads"))
            for n in names]
    arts.sort(key=_order)
    for a in arts:
        a["budget"] = check_budgets(a, budgets)
    mark_pareto(arts)
    rec, reason = recommend(arts, budgets)
    for a in arts:
        a["recommended"] = a["name"] == rec
        miss = a["budget"].pop("miss")   # internal ranking figure; inf is not valid JSON
        a["budget"]["relative_miss"] = None if math.isinf(miss) else round(miss, 4)
    # Host facts and threads as measured (eval threads are capped by the host's cores).
    measured = [evals[a["name"]] for a in arts if a["name"] in evals]
    host = next((m["host"] for m in measured if m.get("host")), {})
    threads = next(((m.get("speed") or {}).get("threads") for m in measured
                    if (m.get("speed") or {}).get("threads")), (config.get("eval") or {}).get("threads"))
    return {
        "run": run_name,
        "profile": config.get("profile"),
        "device": device,
        "budgets": budgets,
        "host": host | {"threads": threads},
        "eval": {k: (config.get("eval") or {}).get(k)
                 for k in ("threads", "seqs", "seq_len", "tasks", "limit", "num_fewshot", "ood")},
        "recommended": rec,
        "recommendation_reason": reason,
        "warnings": warnings,
        "tasks": task_summary(arts),   # also sets each artifact's per-task retention
        "compression": compression_rows(arts, metas),
        "artifacts": arts,
        "samples": sample_section(arts, metas, warnings),
    }


# ---------------------------------------------------------------- small helpers

def _order(a: dict):
    # Teacher first (the reference), then HF stages, then exports from largest to smallest.
    return (not a["teacher"], ORDER.get(a["format"], len(ORDER)), -(a["size_mb"] or 0.0), a["name"])


def _round(x, nd: int = 3):
    return None if x is None else round(float(x), nd)


def fmt_num(x) -> str:
    """Numbers for humans: 3 significant digits, no exponent for ordinary magnitudes."""
    if x is None:
        return "n/a"
    x = float(x)
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:,.{max(0, 2 - int(math.floor(math.log10(abs(x)))) if x else 0)}f}"
    return f"{x:.3g}"


def _q(p) -> str:
    """Shell-quote a path only when it needs it, so common commands stay copy-paste clean."""
    return shlex.quote(str(p))
