"""Time `compress run profile=phone` cold (empty cache: teacher download included) and warm.

    python bench/phone_run.py [--keep-cache] [extra key=value ...]

The phone profile's benchmark task (arc_easy) reads ../shared/data offline: eval.task_data is set to
it when that folder exists and no eval.task_data is given.

Prints wall-clock seconds for the cold run and the warm re-run, each stage's time, and the
tradeoff table's main figures. Targets on a 2-core CPU: cold <= 15 min, warm <= 30 s.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args, env, cwd):
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "compress", "run", *args], env=env, cwd=cwd,
                          capture_output=True, text=True)
    dt = time.time() - t0
    if proc.returncode:
        sys.exit(f"run failed:\n{proc.stderr[-3000:]}")
    return dt, proc.stderr


def main():
    keep = "--keep-cache" in sys.argv
    extra = [a for a in sys.argv[1:] if a != "--keep-cache"]
    work = Path(tempfile.mkdtemp(prefix="compress-bench-"))
    env = dict(os.environ)
    if not keep:
        env["COMPRESS_CACHE"] = str(work / "cache")     # cold: download + generate data again
    load = os.getloadavg()[0]
    print(f"host: {os.cpu_count()} cores, load average {load:.2f} before start")
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if shared.is_dir() and not any(a.startswith("eval.task_data=") for a in extra):
        extra.append(f"eval.task_data={shared}")
    args = ["profile=phone", "name=bench", *extra]
    cold, log = run(args, env, work)
    for line in log.splitlines():
        if line.startswith("✓"):
            print("  " + line)
    warm, _ = run(args, env, work)
    print(f"cold run: {cold:.0f} s ({cold / 60:.1f} min), target <= 900 s")
    print(f"warm re-run: {warm:.1f} s, target <= 30 s")
    report = json.loads((work / "runs" / "bench" / "report.json").read_text())
    print(f"recommended: {report['recommended']}")
    print(f"{'artifact':18s} {'MB':>7s} {'ppl':>7s} {'KLD':>6s} {'top1':>5s} {'OOD KLD':>7s} {'pre t/s':>8s} "
          f"{'dec t/s':>8s} {'RSS MB':>7s}  tasks")
    for a in report["artifacts"]:
        q, s, m = a["quality"], a["speed"], a["memory"]
        ood = (q.get("ood") or {}).get("kld")
        tasks = " ".join(f"{n} {t['value']:.3f}±{t['stderr']:.3f}" if t.get("value") is not None
                         else f"{n} {t.get('unavailable', 'n/a')}" for n, t in q["tasks"].items())
        print(f"{a['name']:18s} {a['size_mb']:7.1f} {q['ppl']:7.2f} {q['kld']:6.3f} {q['top1']:5.3f} "
              f"{ood if ood is not None else float('nan'):7.3f} {s['prefill_tps']:8.1f} {s['decode_tps']:8.1f} "
              f"{m['peak_rss_mb'] or 0:7.0f}  {tasks}")
    print(f"run directory: {work / 'runs' / 'bench'}")


if __name__ == "__main__":
    main()
