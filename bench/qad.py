"""Quantization-aware distillation against the plain files it starts from, per type, in their runtimes.

    python bench/qad.py runs/<phone run> [--types Q4_0,Q4_1,Q4_K_M,int4] [--tokens 8192]
                        [--curve 1024,2048,4096,16384] [--only teacher|distilled] [--limit 200]
                        [--set qad.sampled=0.5 ...] [--curve-only]

Uses a finished run's teacher, distilled student, data split, F16 GGUFs, importance matrices and
references. For each model and type it takes the plain file (llama.cpp's quantizer with the
importance matrix; onnxruntime's MatMulNBits INT4 via the model builder), made here when the run
has none, tunes it with `qad.tokens` train tokens (quantize/qad.py), and scores both in their own
runtime against the teacher: size, perplexity, KLD and top-1 on the held-out set and the
out-of-domain set, and the benchmark tasks (arc_easy and copa from ../shared/data, the first
`--limit` documents). `--curve` re-tunes the teacher's first type at each token count and prints
KLD against tuning tokens. `--set` passes config keys to the tuning (the tuned artifacts are
named after them, so settings compare side by side); `--curve-only` skips the per-type rows.
Prints a markdown table and writes --json.
"""
import argparse
import json
import os
import sys
from pathlib import Path

# bench/onnx.py would shadow the onnx package for a script run from this folder
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from compress import artifacts
from compress.config import load_config
from compress.evaluate.stage import run as evaluate
from compress.quantize import gguf as quantize_gguf, qad, qad_onnx

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def score(cfg, art, work: Path, run: Path, threads: int) -> dict:
    out = work / f"eval-{art.name}"
    e = artifacts.load(out) if (out / "meta.json").is_file() else evaluate(
        cfg, art, out, teacher=artifacts.load(run / "teacher"), data=artifacts.load(run / "data"),
        reference=artifacts.load(run / "reference"),
        ood=artifacts.load(run / "reference-ood") if (run / "reference-ood").is_dir() else None, threads=threads)
    q = e.meta["metrics"]["quality"]
    tasks = {k: (v.get("value"), v.get("stderr"), v.get("n")) for k, v in (q.get("tasks") or {}).items()}
    return {"mb": round(art.meta["size_bytes"] / 1e6, 2), "ppl": q["ppl"], "kld": q["kld"], "top1": q["top1"],
            "ood_kld": (q.get("ood") or {}).get("kld"), "ood_top1": (q.get("ood") or {}).get("top1"), "tasks": tasks}


def plain_file(cfg, run: Path, work: Path, source: str, qtype: str):
    """The plain quantized artifact of `source` at `qtype`: the run's, or made here."""
    from compress.export import onnx as export_onnx
    from compress.quantize import onnx as quantize_onnx
    prefix = "teacher-" if source == "teacher" else ""
    name = f"{prefix}{'onnx' if qtype == 'int4' else 'gguf'}-{qtype}"
    for where in (run, work):
        if (where / name / "meta.json").is_file():
            return artifacts.load(where / name)
    hf = artifacts.load(run / source)
    if qtype == "int4":
        fp32_dir = run / f"{prefix}onnx-fp32"
        fp32 = artifacts.load(fp32_dir) if fp32_dir.is_dir() else export_onnx.run(
            cfg, hf, work / f"{prefix}onnx-fp32", teacher=artifacts.load(run / "teacher"))
        return quantize_onnx.run(cfg, hf, work / name, qtype="int4", fp32=fp32)
    return quantize_gguf.run(cfg, artifacts.load(run / f"{prefix}gguf-F16"), work / name, qtype=qtype,
                             imatrix=artifacts.load(run / f"{prefix}imatrix"))


def tune(cfg, run: Path, work: Path, source: str, plain, tag: str = ""):
    stage = qad_onnx.run if plain.meta["format"] == "onnx" else qad.run
    out = work / f"{plain.name}-qad{tag}"
    if (out / "meta.json").is_file():
        return artifacts.load(out)
    return stage(cfg, plain, out, hf=artifacts.load(run / source), teacher=artifacts.load(run / "teacher"),
                 data=artifacts.load(run / "data"))


def fmt(x, pct=False):
    if x is None:
        return "n/a"
    return f"{100 * x:.1f} %" if pct else (f"{x:.4f}" if x < 10 else f"{x:.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--types", default="Q4_0,Q4_1,Q4_K_M,int4")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--curve", default="")
    ap.add_argument("--only", choices=("teacher", "distilled"))
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--json", default=None)
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE config for the tuning")
    ap.add_argument("--curve-only", action="store_true")
    args = ap.parse_args()
    tag = "".join("-" + "".join(c if c.isalnum() else "_" for c in kv) for kv in args.set)
    run = Path(args.run).resolve()
    work = run.parent / f"{run.name}-qad-bench"
    threads = min(2, os.cpu_count() or 1)
    tasks = "[arc_easy,copa]" if SHARED.is_dir() else "[]"
    base = [f"out={run.parent}", f"name={run.name}", "export.onnx=fp32", "quantize.onnx=[int4]",
            f"eval.tasks={tasks}", f"eval.limit={args.limit}", "eval.memory=false", f"eval.task_data={SHARED}"]
    cfg = load_config(base + args.set + [f"qad.tokens={args.tokens}"])
    print(f"host: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; tuning {args.tokens} tokens; "
          f"threads {threads}", flush=True)
    rows = []
    for source in ("teacher", "distilled"):
        if (args.only and source != args.only) or args.curve_only:
            continue
        for qtype in args.types.split(","):
            plain = plain_file(cfg, run, work, source, qtype)
            tuned = tune(cfg, run, work, source, plain, tag=tag)
            m = tuned.meta["metrics"]
            row = {"model": source, "type": qtype, "plain": score(cfg, plain, work, run, threads),
                   "tuned": score(cfg, tuned, work, run, threads), "tokens": m["tokens"], "seconds": m["seconds"],
                   "ms_per_token": m["ms_per_token"], "stage_s": tuned.meta["cost"]["wall_s"],
                   "shipped": m["shipped"], "kept": m.get("kept_types"), "check": m.get("check")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    curve = []
    if args.curve:
        qtype = args.types.split(",")[0]
        plain = plain_file(cfg, run, work, "teacher", qtype)
        curve_base = base[:4] + ["eval.tasks=[]", "eval.memory=false"]   # KLD only: no tasks
        for n in map(int, args.curve.split(",")):
            c = load_config(curve_base + args.set + [f"qad.tokens={n}"])
            tuned = tune(c, run, work, "teacher", plain, tag=f"-{n}{tag}")
            s = score(c, tuned, work / f"curve-{n}{tag}", run, threads)
            curve.append({"tokens": n, "kld": s["kld"], "ood_kld": s["ood_kld"], "top1": s["top1"],
                          "ood_top1": s["ood_top1"], "seconds": tuned.meta["metrics"]["seconds"],
                          "sample_seconds": tuned.meta["metrics"].get("sample_seconds")})
            print(json.dumps(curve[-1]), flush=True)
    print("\n| model | type | MB | ppl | KLD | top-1 | OOD KLD | arc_easy | copa | QAD MB | QAD ppl | QAD KLD | "
          "QAD top-1 | QAD OOD KLD | QAD arc_easy | QAD copa | tokens | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = []
        for k in ("plain", "tuned"):
            s = r[k]
            t = {n: f"{v:.3f} ± {e:.3f}" if v is not None else "n/a" for n, (v, e, _) in s["tasks"].items()}
            cells += [f"{s['mb']:.1f}", fmt(s["ppl"]), fmt(s["kld"]), fmt(s["top1"], True), fmt(s["ood_kld"]),
                      t.get("arc_easy", "n/a"), t.get("copa", "n/a")]
        print(f"| {r['model']} | {r['type']} | " + " | ".join(cells) + f" | {r['tokens']} | {r['seconds']:.0f} |")
    if curve:
        print("\n| tuning tokens | KLD | OOD KLD | top-1 | s |\n|---:|---:|---:|---:|---:|")
        for c in curve:
            print(f"| {c['tokens']} | {fmt(c['kld'])} | {fmt(c['ood_kld'])} | {fmt(c['top1'], True)} | {c['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "curve": curve}, indent=1))


if __name__ == "__main__":
    main()
