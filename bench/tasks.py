"""Benchmark accuracy per artifact, and whether lossless exports score like the HF model.

    python bench/tasks.py runs/<name> [--tasks=arc_easy,copa] [--limit=200] [--threads=2]

1. Prints the run's own task table (report.json: accuracy ± stderr and retention per artifact).
2. Consistency: scores the run's teacher (HF, torch), its GGUF F16 export (llama.cpp) and, when the
   run has one, its ONNX fp32 export (onnxruntime) on the same tasks with the same adapter and the
   teacher's tokenizer, and checks each export is within one stderr of the HF artifact. Uses the
   offline copies in ../shared/data through the YAMLs compress ships (eval.task_data).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def run_table(run: Path) -> None:
    report = json.loads((run / "report.json").read_text())
    tasks = report.get("tasks") or {}
    if not tasks:
        print("the run has no task results (eval.tasks was empty)")
        return
    for name, t in tasks.items():
        print(f"{name}: {t.get('metric')}, n={t.get('n')}, chance {t.get('chance')}")
    print(f"{'artifact':22s} " + " ".join(f"{n:>24s}" for n in tasks))
    for a in report["artifacts"]:
        cells = []
        for n in tasks:
            r = a["quality"]["tasks"].get(n) or {}
            ret = f" ({100 * r['retention']:.0f}%)" if r.get("retention") is not None else ""
            cells.append(f"{r['value']:.3f} ± {r['stderr']:.3f}{ret}" if r.get("value") is not None else "n/a")
        print(f"{a['name']:22s} " + " ".join(f"{c:>24s}" for c in cells))


def consistency(run: Path, task_names: list[str], limit: int, threads: int) -> None:
    from compress import artifacts
    from compress.config import load_config
    from compress.evaluate import tasks
    from compress.evaluate.runtimes import open_runtime
    from compress.evaluate.stage import _tokenizer, task_context
    cfg = load_config([f"eval.tasks=[{','.join(task_names)}]", f"eval.limit={limit}",
                       f"eval.task_data={SHARED.resolve()}"])
    teacher = artifacts.load(run / "teacher")
    tok = _tokenizer(teacher)
    names = ["teacher"] + [n for n in ("teacher-gguf-F16", "teacher-onnx-fp32") if (run / n / "meta.json").is_file()]
    results = {}
    for name in names:
        art = artifacts.load(run / name)
        t0 = time.time()
        results[name] = tasks.run(cfg, lambda n, a=art: open_runtime(a, threads, vocab=len(tok), n_ctx=n),
                                  tok, task_context(teacher))
        print(f"{name}: scored in {time.time() - t0:.0f} s")
    ref = results["teacher"]
    for task in task_names:
        r = ref[task]
        print(f"{task} ({r['metric']}, n={r['n']}, chance {r['chance']:.3f}):")
        for name in names:
            x = results[name][task]
            diff = abs(x["value"] - r["value"])
            verdict = "" if name == "teacher" else (" within 1 stderr" if diff <= r["stderr"] else " OUTSIDE 1 stderr")
            print(f"  {name:20s} {x['value']:.3f} ± {x['stderr']:.3f}  |Δ| {diff:.3f}{verdict}")


if __name__ == "__main__":
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    opt = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
    if not pos:
        sys.exit(__doc__)
    run_dir = Path(pos[0])
    if (run_dir / "report.json").is_file():
        run_table(run_dir)
    consistency(run_dir, opt.get("tasks", "arc_easy,copa").split(","), int(opt.get("limit", 200)),
                int(opt.get("threads", 2)))
