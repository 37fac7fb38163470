"""Check a run's transformers.js directory in transformers.js itself against compress's own
onnxruntime evaluation: same prompt token ids, same greedy next token at every position.

    compress run profile=browser name=web                      # -> runs/web/browser/
    npm install --prefix bench --ignore-scripts @huggingface/transformers   # Node build, onnxruntime-node CPU
    python bench/browser.py runs/web

The app-side code path (config.json, tokenizer files, onnx/<dtype file>, external weights, the
empty first-step KV cache transformers.js builds from the graph's declared shapes) is exercised in
Node; the browser itself runs the same files through onnxruntime-web.
"""
import json
import subprocess
import sys
from pathlib import Path

from compress import artifacts
from compress.evaluate.runtimes import open_runtime
from compress.models import load_tokenizer

DTYPE_OF_QUANT = {"fp32": "fp32", "int8": "q8", "int4": "q4"}
PROMPT = "The capital of France is"


def main(run: Path) -> int:
    layout = artifacts.load(run / "browser")
    tok = load_tokenizer(str(layout.path))
    ids = tok(PROMPT, add_special_tokens=False)["input_ids"] + tok(" Paris, and the", add_special_tokens=False)["input_ids"]
    script = Path(__file__).with_name("transformers_js.mjs")
    ok = True
    for name in layout.meta["metrics"]["from"]:
        art = artifacts.load(run / name)
        rt = open_runtime(art, threads=2, n_ctx=len(ids) + 8)
        ours = rt.logprobs(ids).argmax(-1).tolist()
        rt.close()
        dtype = DTYPE_OF_QUANT[art.meta["quant"]]
        proc = subprocess.run(["node", str(script), str(layout.path), dtype, ",".join(map(str, ids))],
                              capture_output=True, text=True)
        if proc.returncode:
            print(f"FAIL {dtype}: transformers.js could not run it: {proc.stderr.strip()[-500:]}")
            ok = False
            continue
        js = json.loads(proc.stdout.strip().splitlines()[-1])
        same_tok = js["prompt_ids"] == tok(PROMPT)["input_ids"]
        agree = sum(a == b for a, b in zip(js["greedy_next"], ours)) / len(ours)
        print(f"{'PASS' if same_tok and agree == 1.0 else 'FAIL'} {dtype:4s} ({name}): tokenizer ids equal: "
              f"{same_tok}; greedy next-token agreement with onnxruntime: {100 * agree:.0f}% of {len(ours)}; "
              f"text: {js['text']!r}")
        ok &= same_tok and agree == 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/browser.py runs/<name>")
    raise SystemExit(main(Path(sys.argv[1])))
