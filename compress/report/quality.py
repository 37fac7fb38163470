"""Benchmark tasks, robustness and the compression table of a report, from eval metrics only.

    tasks = task_summary(arts)           # {task: {metric, chance, n, teacher}}; adds retention per artifact
    rows = compression_rows(arts, metas) # teacher -> distilled -> (+ pruned) -> + quantized, vs the teacher

Retention measures what an artifact keeps of the teacher's skill *above chance*:
(acc - chance) / (teacher_acc - chance), so a model that guesses scores 0 and the teacher 1.
It is None when the teacher itself is not above chance (nothing to retain).
"""
from __future__ import annotations

from ..config import STAGES as STAGE_ORDER

# What each stage adds to an artifact's recipe, walking its parents up to the teacher.
RECIPE = {"student": "layer-dropped", "prune": "pruned", "distill": "distilled"}
# ... and what tunes a quantized file (quantize/qad.py) after it was made.
TUNED = {"qad": "QAD"}


def task_summary(arts: list[dict]) -> dict:
    """Per task: the primary metric, chance level, documents and the teacher's score; sets retention."""
    teacher = next((a for a in arts if a["teacher"]), None)
    t_tasks = (teacher or {}).get("quality", {}).get("tasks") or {}
    out = {}
    for a in arts:
        for name, r in (a["quality"].get("tasks") or {}).items():
            if "unavailable" in r:
                out.setdefault(name, {"metric": None, "chance": None, "n": None, "teacher": None,
                                      "unavailable": r["unavailable"]})
                continue
            t = t_tasks.get(name) or {}
            r["retention"] = retention(r.get("value"), t.get("value"), r.get("chance"))
            entry = out.setdefault(name, {})
            entry.pop("unavailable", None)
            entry.update({"metric": r.get("metric"), "chance": r.get("chance"), "n": r.get("n"),
                          "teacher": t.get("value"), "teacher_stderr": t.get("stderr")})
    return out


def retention(value, teacher_value, chance) -> float | None:
    if value is None or teacher_value is None or chance is None or teacher_value - chance <= 0:
        return None
    return round((value - chance) / (teacher_value - chance), 4)


def recipe(name: str, metas: dict) -> str:
    """'layer-dropped + distilled + GGUF Q4_K_M', 'teacher + GGUF Q8_0': the steps from the teacher."""
    steps, seen, quantized = [], set(), False
    while name in metas and name not in seen:
        seen.add(name)
        m = metas[name]
        stage = m.get("stage")
        if stage == "teacher":
            break
        if stage in RECIPE or stage in TUNED:
            steps.append(RECIPE.get(stage) or TUNED[stage])
        elif stage == "quantize" or (stage == "export" and not quantized):
            steps.append(f"{(m.get('format') or '').upper()} {m.get('quant') or ''}".strip())
            quantized = True
        name = m.get("parent")
    steps.reverse()
    if not any(s in RECIPE.values() for s in steps):
        steps.insert(0, "teacher")
    return " + ".join(steps)


def cost(name: str, metas: dict) -> dict | None:
    """What making `name` cost: each ancestor (and itself) counted once, summed per stage.

    {"total_s", "peak_rss_mb" (the largest of the recipe's stages), "stages": {stage: {"wall_s",
    "device"}}, "summary": "distill 5.4 min + quantize 2 s"}; None when no stage recorded a cost.
    """
    todo, seen, stages, peak = [name], set(), {}, None
    while todo:
        n = todo.pop()
        if n in seen or n not in metas:
            continue
        seen.add(n)
        m = metas[n]
        todo += [p.get("name") for p in m.get("parents") or []]
        c = m.get("cost")
        if not c:
            continue
        s = stages.setdefault(m.get("stage") or "?", {"wall_s": 0.0, "device": "cpu"})
        s["wall_s"] = round(s["wall_s"] + (c.get("wall_s") or 0.0), 3)
        if c.get("device") not in (None, "cpu"):
            s["device"] = c["device"]
        if c.get("peak_rss_mb") is not None:
            peak = max(peak or 0.0, c["peak_rss_mb"])
    if not stages:
        return None
    order = [s for s in STAGE_ORDER if s in stages] + sorted(set(stages) - set(STAGE_ORDER))
    summary = " + ".join(f"{s} {duration(stages[s]['wall_s'])}"
                         + ("" if stages[s]["device"] == "cpu" else f" {stages[s]['device']}") for s in order)
    return {"total_s": round(sum(s["wall_s"] for s in stages.values()), 3), "peak_rss_mb": peak,
            "stages": {s: stages[s] for s in order}, "summary": summary}


def duration(seconds: float) -> str:
    """2 s, 5.4 min, 1.2 h."""
    if seconds < 60:
        return f"{seconds:.2g} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def mean_retention(a: dict):
    vals = [r["retention"] for r in (a["quality"].get("tasks") or {}).values()
            if isinstance(r, dict) and r.get("retention") is not None]
    return round(sum(vals) / len(vals), 4) if vals else None


def compression_rows(arts: list[dict], metas: dict) -> list[dict]:
    """Each artifact against the teacher as given (its size, its measured decode speed, its ppl)."""
    teacher = next((a for a in arts if a["teacher"] and a["format"] == "hf"), None)
    if teacher is None:
        return []
    t_size, t_dec, t_ppl = teacher["size_mb"], teacher["speed"]["decode_tps"], teacher["quality"]["ppl"]
    rows = []
    for a in arts:
        q = a["quality"]
        rows.append({
            "name": a["name"],
            "recipe": "teacher (as given)" if a is teacher else recipe(a["name"], metas),
            "cost": cost(a["name"], metas),
            "size_mb": a["size_mb"],
            "size_reduction": _ratio(t_size, a["size_mb"]),
            "decode_tps": a["speed"]["decode_tps"],
            "decode_speedup": _ratio(a["speed"]["decode_tps"], t_dec),
            "ppl": q["ppl"],
            "ppl_change": _ratio(q["ppl"], t_ppl),
            "kld": q["kld"],
            "ood_kld": (q.get("ood") or {}).get("kld"),
            "task_retention": mean_retention(a),
        })
    return rows


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None
