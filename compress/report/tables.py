"""The report's second tables: benchmark tasks, robustness (out-of-domain) and compression vs teacher.

    for title, head, rows, note in extra_tables(report): ...   # plain-text cells, any renderer

Each is (title, header cells, rows of cells, legend) so markdown, HTML and the terminal share them.
"""
from __future__ import annotations

from .build import fmt_num


def _acc(r: dict | None) -> str:
    if not r:
        return "n/a"
    if "unavailable" in r:
        return "unavailable"
    if r.get("value") is None:
        return "n/a"
    err = f" ± {r['stderr']:.3f}" if r.get("stderr") is not None else ""
    ret = f" ({100 * r['retention']:.0f}%)" if r.get("retention") is not None else ""
    return f"{r['value']:.3f}{err}{ret}"


def task_table(report: dict):
    tasks = report.get("tasks") or {}
    if not tasks:
        return None
    head = ["Artifact"] + [f"{t} {v.get('metric') or ''}".strip() for t, v in tasks.items()]
    rows = [[a["name"]] + [_acc((a["quality"].get("tasks") or {}).get(t)) for t in tasks]
            for a in report["artifacts"] if a.get("evaluated")]
    facts = "; ".join(f"{t}: n={v.get('n')}, chance {fmt_num(v.get('chance'))}" if not v.get("unavailable")
                      else f"{t}: {v['unavailable']}" for t, v in tasks.items())
    note = ("lm-eval tasks scored on each artifact in its own runtime with the teacher's tokenizer: "
            "value ± stderr (retention of the teacher's skill above chance = (acc − chance) / "
            f"(teacher − chance)). {facts}.")
    return "Benchmark tasks", head, rows, note


def robustness_table(report: dict):
    arts = [a for a in report["artifacts"] if a.get("evaluated")]
    if not any(a["quality"].get("ood") for a in arts):
        return None
    head = ["Artifact", "PPL", "KLD", "Top-1", "OOD PPL", "OOD KLD", "OOD Top-1"]
    rows = []
    for a in arts:
        q, o = a["quality"], a["quality"].get("ood") or {}
        rows.append([a["name"], fmt_num(q["ppl"]), fmt_num(q["kld"]), _pct(q["top1"]),
                     fmt_num(o.get("ppl")), fmt_num(o.get("kld")), _pct(o.get("top1"))])
    src = next((a["quality"]["ood"].get("source") for a in arts if a["quality"].get("ood")), None)
    src = "source code from Python's standard library (eval.ood=builtin)" if src == "builtin" else src
    note = (f"In-domain: the held-out split of the run's data. Out-of-domain (OOD): {src}, "
            "scored the same way against the teacher.")
    return "Robustness: in-domain vs out-of-domain", head, rows, note


def compression_table(report: dict):
    rows = report.get("compression") or []
    if not rows:
        return None
    head = ["Artifact", "Recipe", "Size MB", "Size ×smaller", "Decode tok/s", "Decode ×faster",
            "PPL", "PPL ×", "KLD", "OOD KLD", "Task retention", "Cost to make"]
    cells = [[r["name"], r["recipe"], fmt_num(r["size_mb"]), _x(r["size_reduction"]), fmt_num(r["decode_tps"]),
              _x(r["decode_speedup"]), fmt_num(r["ppl"]), _x(r["ppl_change"]), fmt_num(r["kld"]),
              fmt_num(r["ood_kld"]), _pct(r["task_retention"]), (r.get("cost") or {}).get("summary") or "n/a"]
             for r in rows]
    note = ("Measured on this run, against the teacher as given (HF in torch): size reduction, host decode "
            "speed-up (each artifact in its own runtime, so it includes the runtime change), perplexity "
            "ratio, KLD, and mean task retention above chance. Cost to make: the wall time of every stage "
            "in the artifact's recipe (each counted once, on the device named; CPU otherwise).")
    return "Compression vs the teacher", head, cells, note


def extra_tables(report: dict) -> list:
    return [t for t in (task_table(report), robustness_table(report), compression_table(report)) if t]


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _x(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"
