"""Size-KLD curve of llama.cpp's uniform imatrix types against compress's auto mixes of the same size.

    python bench/mix.py runs/<name> [--only teacher|distilled] [--types Q8_0,Q6_K,...] [--plot docs/mix.png]

Uses a finished run's teacher and distilled student, their F16 GGUF exports, importance matrices and
references (every artifact is scored on the run's held-out and out-of-domain token ids, against the
teacher, in llama.cpp). For each type it builds llama.cpp's own quantization (with the importance
matrix) and an auto mix sized to that file (`quantize.gguf=auto:<MB>MB`), and prints size, KLD and
top-1 in-domain and out-of-domain, the mix's predicted KLD, and the time the mix took.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from compress import artifacts
from compress.config import load_config
from compress.evaluate.stage import run as evaluate
from compress.quantize import gguf as quantize_gguf, imatrix, mix, sensitivity

TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]


def quality(cfg, art, work, run, threads):
    e = evaluate(cfg, art, work / f"eval-{art.name}", teacher=artifacts.load(run / "teacher"),
                 data=artifacts.load(run / "data"), reference=artifacts.load(run / "reference"),
                 ood=artifacts.load(run / "reference-ood") if (run / "reference-ood").is_dir() else None,
                 threads=threads)
    q = e.meta["metrics"]["quality"]
    return {"mb": art.meta["size_bytes"] / 1e6, "kld": q["kld"], "top1": q["top1"],
            "ood_kld": (q.get("ood") or {}).get("kld"), "ood_top1": (q.get("ood") or {}).get("top1")}


def source_parts(run: Path, source: str, cfg, work: Path):
    """(F16, imatrix, sensitivity) of the teacher or the distilled student, made when the run has none."""
    prefix = "teacher-" if source == "teacher" else ""
    hf, data = artifacts.load(run / source), artifacts.load(run / "data")
    f16 = artifacts.load(run / f"{prefix}gguf-F16")
    im = artifacts.load(run / f"{prefix}imatrix")
    t0 = time.time()
    sens_dir = run / f"{prefix}sensitivity"
    sens = artifacts.load(sens_dir) if sens_dir.is_dir() else sensitivity.run(cfg, hf, work / f"{prefix}sensitivity", data=data)
    return f16, im, sens, time.time() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--only", choices=("teacher", "distilled"))
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    run_cfg = json.loads((run / "meta.json").read_text())["config"]
    ev = run_cfg["eval"]
    threads = min(2, os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp(prefix="compress-mix-"))
    cfg = load_config([f"out={work}", "name=b", f"eval.seqs={ev['seqs']}", f"eval.seq_len={ev['seq_len']}",
                       f"eval.ood={ev['ood']}", f"eval.ood_seqs={ev['ood_seqs']}", "eval.memory=false",
                       "eval.prefill_tokens=8", "eval.decode_tokens=1", "eval.tasks=[]",
                       f"quantize.mix_tokens={run_cfg['quantize'].get('mix_tokens', 1024)}"])
    print(f"run {run}; held-out {ev['seqs']}x{ev['seq_len']} tokens and out-of-domain {ev['ood_seqs']}x{ev['seq_len']}; "
          f"llama.cpp, {threads} threads; host {os.cpu_count()} cores")
    results = {}
    for source in ([args.only] if args.only else ["teacher", "distilled"]):
        f16, im, sens, sens_s = source_parts(run, source, cfg, work)
        rows = []
        base = quality(cfg, f16, work, run, threads)
        print(f"\n{source}: F16 {base['mb']:.1f} MB, KLD {base['kld']:.4f}; sensitivity {sens_s:.0f} s "
              f"(0 when the run made it)")
        print(f"{'type':8s} {'MB':>7s} {'KLD':>8s} {'top1':>6s} {'OOD KLD':>8s} | {'auto MB':>7s} {'KLD':>8s} "
              f"{'top1':>6s} {'OOD KLD':>8s} {'pred.':>8s} {'ΔKLD':>7s} {'s':>5s}")
        for t in args.types.split(","):
            uni = quantize_gguf.run(cfg, f16, work / f"{source}-gguf-{t}", qtype=t, imatrix=im)
            u = quality(cfg, uni, work, run, threads)
            target = f"auto:{math.ceil(u['mb'] * 1000) / 1000:g}MB"   # the uniform file fits it too
            t0 = time.time()
            am = mix.run(cfg, f16, work / f"{source}-{mix.artifact_name(target)}", qtype=target, imatrix=im,
                         sensitivity=sens)
            secs = time.time() - t0
            a = quality(cfg, am, work, run, threads)
            a["predicted"] = am.meta["metrics"]["predicted_kld"]
            a["types"] = am.meta["metrics"]["tensor_types"]
            rows.append({"type": t, "uniform": u, "auto": a, "mix_s": secs})
            print(f"{t:8s} {u['mb']:7.1f} {u['kld']:8.4f} {u['top1']:6.3f} {u['ood_kld'] or float('nan'):8.4f} | "
                  f"{a['mb']:7.1f} {a['kld']:8.4f} {a['top1']:6.3f} {a['ood_kld'] or float('nan'):8.4f} "
                  f"{a['predicted']:8.4f} {(a['kld'] / u['kld'] - 1) * 100:+6.1f}% {secs:5.0f}")
            sys.stdout.flush()
        results[source] = {"f16": base, "rows": rows, "sensitivity_s": sens_s}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, Path(args.plot))


def plot(results: dict, path: Path) -> None:
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5 * len(results), 3.6))
    for i, (source, r) in enumerate(results.items()):
        ax = fig.add_subplot(1, len(results), i + 1)
        for kind, style in (("uniform", "o-"), ("auto", "s-")):
            pts = sorted((row[kind]["mb"], row[kind]["kld"]) for row in r["rows"])
            ax.plot(*zip(*pts), style, label="llama.cpp uniform + imatrix" if kind == "uniform" else "compress auto mix")
        for row in r["rows"]:
            ax.annotate(row["type"], (row["uniform"]["mb"], row["uniform"]["kld"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("file size, MB")
        ax.set_ylabel("KLD vs teacher, nats/token (held-out)")
        ax.set_title(source)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
