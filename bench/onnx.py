"""ONNX and bitsandbytes artifacts of a run against the HF model they came from, measured in their
own runtimes (onnxruntime; torch + bitsandbytes).

    compress run profile=phone name=bench export.onnx=fp32 quantize.onnx=[int8,int4] quantize.bnb=[int8,nf4]
    python bench/onnx.py runs/bench

Prints, for the teacher and the distilled student: every artifact's size, held-out perplexity and its
change vs the HF model, KLD and top-1 agreement vs the teacher, and host prefill/decode speed; then the
checks the ONNX path promises: fp32 ONNX agrees with HF on >= 99.9 % of held-out top-1 tokens and
INT8 stays within +5 % perplexity of fp32. All figures are read from the run's eval meta files,
which the evaluate stage measured in each artifact's runtime.
"""
import json
import sys
from pathlib import Path


def load(run: Path, name: str):
    ev, art = run / f"eval-{name}" / "meta.json", run / name / "meta.json"
    if not ev.is_file() or not art.is_file():
        return None
    m = json.loads(ev.read_text())["metrics"]
    return {**m, "size_mb": json.loads(art.read_text())["size_bytes"] / 1e6}


def main(run: Path) -> int:
    checks = []
    for prefix, hf_name in (("teacher-", "teacher"), ("", "distilled")):
        hf = load(run, hf_name)
        if hf is None:
            continue
        print(f"\n{hf_name}: HF ppl {hf['quality']['ppl']:.3f}")
        print(f"{'artifact':24s} {'runtime':28s} {'MB':>7s} {'ppl':>8s} {'Δppl':>7s} {'KLD':>7s} "
              f"{'top-1':>6s} {'prefill':>8s} {'decode':>7s} {'RSS MB':>7s}")
        names = [hf_name] + [f"{prefix}{n}" for n in ("onnx-fp32", "onnx-int8", "onnx-int4", "bnb-int8", "bnb-nf4",
                                                     "gguf-Q8_0", "gguf-Q4_K_M")]
        rows = {n: load(run, n) for n in names}
        for n, m in rows.items():
            if m is None:
                continue
            q, s = m["quality"], m["speed"]
            d = 100 * (q["ppl"] / hf["quality"]["ppl"] - 1)
            rt = m["runtime"] + (f" ({m['device']})" if m.get("device") and "bitsandbytes" not in m["runtime"] else "")
            print(f"{n:24s} {rt:28s} {m['size_mb']:7.1f} {q['ppl']:8.3f} {d:+6.1f}% {q['kld']:7.4f} "
                  f"{100 * q['top1']:5.1f}% {s['prefill_tps']:8.0f} {s['decode_tps']:7.1f} "
                  f"{m['memory']['peak_rss_mb'] or 0:7.0f}")
        fp32, int8 = rows.get(f"{prefix}onnx-fp32"), rows.get(f"{prefix}onnx-int8")
        if prefix == "teacher-" and fp32:   # top-1 vs the teacher = agreement with the HF model itself
            checks.append(("fp32 ONNX top-1 agreement with HF (teacher) >= 99.9 %", 100 * fp32["quality"]["top1"],
                           fp32["quality"]["top1"] >= 0.999))
        if fp32 and int8:
            change = 100 * (int8["quality"]["ppl"] / fp32["quality"]["ppl"] - 1)
            checks.append((f"INT8 ppl within +5 % of fp32 ({hf_name})", change, change <= 5.0))
    print()
    for label, value, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}: {value:.2f}")
    return 0 if checks and all(ok for *_, ok in checks) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/onnx.py runs/<name>")
    raise SystemExit(main(Path(sys.argv[1])))
