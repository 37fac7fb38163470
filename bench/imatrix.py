"""Effect of the importance matrix on GGUF quantization, measured in llama.cpp.

    python bench/imatrix.py runs/<name> [Q4_0 Q4_K_M ...]

Uses a finished run's distilled student (or `--teacher` for the teacher itself), its F16 GGUF
export and its calibration data. For each type it quantizes with and without the importance
matrix and prints held-out perplexity, KLD and top-1 vs the teacher (same token ids, llama.cpp).
"""
import sys
import tempfile
from pathlib import Path

from compress import artifacts
from compress.config import load_config
from compress.evaluate import run as evaluate
from compress.export import gguf as export_gguf
from compress.quantize import gguf as quantize_gguf, imatrix


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    run_dir = Path(args[0])
    types = args[1:] or ["Q4_0", "Q4_K_M"]
    source = "teacher" if "--teacher" in sys.argv else "distilled"
    teacher, data = artifacts.load(run_dir / "teacher"), artifacts.load(run_dir / "data")
    hf = artifacts.load(run_dir / source)
    work = Path(tempfile.mkdtemp(prefix="compress-imatrix-"))
    cfg = load_config([f"out={work}", "name=b", "eval.memory=false", "eval.decode_tokens=0", "eval.threads=1"])
    f16 = export_gguf.run(cfg, hf, work / "b" / "gguf-F16", teacher=teacher)
    imat = imatrix.run(cfg, hf, work / "b" / "imatrix", data=data)
    print(f"source: {run_dir / source}; held-out {cfg.eval.seqs}x{cfg.eval.seq_len} tokens; llama.cpp, 1 thread")
    print(f"{'type':8s} {'imatrix':8s} {'MB':>6s} {'ppl':>8s} {'KLD':>7s} {'top1':>6s}")
    for art in [f16]:
        q = evaluate(cfg, art, work / "b" / f"eval-{art.name}", teacher=teacher, data=data).meta["metrics"]["quality"]
        print(f"{'F16':8s} {'-':8s} {art.meta['size_bytes'] / 1e6:6.1f} {q['ppl']:8.2f} {q['kld']:7.4f} {q['top1']:6.3f}")
    for t in types:
        for im in (None, imat):
            name = f"gguf-{t}-{'im' if im else 'plain'}"
            art = quantize_gguf.run(cfg, f16, work / "b" / name, qtype=t, imatrix=im)
            q = evaluate(cfg, art, work / "b" / f"eval-{name}", teacher=teacher, data=data).meta["metrics"]["quality"]
            print(f"{t:8s} {'yes' if im else 'no':8s} {art.meta['size_bytes'] / 1e6:6.1f} {q['ppl']:8.2f} "
                  f"{q['kld']:7.4f} {q['top1']:6.3f}")


if __name__ == "__main__":
    main()
