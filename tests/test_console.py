"""What a user reads on the console: no library progress bars in logs, tables readable in a pipe
and in a narrow terminal, and a missing optional package named before the first stage."""
from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from compress.report.render import DROP_ORDER, print_table
from compress.report.terminal import text_table, widths

ROOT = Path(__file__).resolve().parents[1]

BAR = """
import sys
{pre}
from compress.cli import quiet_progress
if sys.argv[1] == "quiet":
    quiet_progress(sys.stderr)
from transformers.modeling_gguf_pytorch_utils import tqdm   # the GGUF loader's bar
for _ in tqdm(range(3), desc="Converting"):
    pass
from tqdm import tqdm as plain
for _ in plain(range(3), desc="Explicit", disable=False):    # as lm-eval passes it
    pass
"""


@pytest.mark.parametrize("pre", ["", "import tqdm.std"], ids=["tqdm-not-yet-imported", "tqdm-already-imported"])
def test_library_progress_bars_are_silent_when_stderr_is_not_a_terminal(pre):
    def run(mode):
        return subprocess.run([sys.executable, "-c", BAR.format(pre=pre), mode], capture_output=True, text=True,
                              cwd=ROOT).stderr
    assert "Converting" in run("loud") and "Explicit" in run("loud")   # the bars exist ...
    assert run("quiet") == ""                                           # ... and are gone


REPORT = {"run": "r", "profile": "phone", "device": {"name": "Pixel 8"}, "recommended": "gguf-Q4_K_M",
          "recommendation_reason": "smallest within budget", "warnings": [], "tasks": {}, "compression": [],
          "artifacts": []}


def art(name, size, kld, recommended=False):
    return {"name": name, "format": "gguf", "quant": name.split("-")[-1], "runtime": "llama.cpp",
            "size_mb": size, "params": 134_515_008, "teacher": False, "recommended": recommended, "pareto": True,
            "quality": {"ppl": 12.3456, "kld": kld, "top1": 0.9, "ood": None, "tasks": {}},
            "speed": {"threads": 4, "prefill_tps": 512.0, "decode_tps": 61.2},
            "memory": {"peak_rss_mb": 180.5}, "estimate": {"decode_tps": 210.0},
            "budget": {"pass": True, "failed": [], "unchecked": []}}


def report():
    return REPORT | {"artifacts": [art("teacher-gguf-Q4_K_M", 105.4, 0.0427),
                                   art("gguf-Q4_K_M", 62.1, 0.311, recommended=True)]}


def test_table_in_a_pipe_is_one_aligned_line_per_artifact():
    out = io.StringIO()
    print_table(report(), Console(file=out, width=80))   # a file: not a terminal
    lines = out.getvalue().splitlines()
    rows = [l for l in lines if l.startswith("| ")]
    assert len(rows) == 3 and len({len(l) for l in rows}) == 1          # header + 2 rows, aligned
    assert "| gguf-Q4_K_M ★ " in rows[2] and "Pixel 8" in rows[0] and len(rows[0]) > 80   # nothing wrapped
    assert "\\_" not in out.getvalue()                                  # no markdown escapes in plain text


@pytest.mark.parametrize("width", [200, 100, 60])
def test_table_in_a_terminal_fits_and_names_what_it_left_out(width):
    out = io.StringIO()
    print_table(report(), Console(file=out, width=width, force_terminal=True, color_system=None), full="runs/r/report.md")
    text = out.getvalue()
    assert max(len(l) for l in text.splitlines() if l.startswith(("┃", "│", "┏"))) <= width
    assert "gguf-Q4_K_M ★" in text and "0.311" in text                  # name and KLD are whole
    if width < 200:
        assert "left out to fit this terminal" in text and "runs/r/report.md" in text
    else:
        assert "left out" not in text


def test_columns_are_dropped_in_the_given_order_first():
    head = ["Artifact", "A", "B", "C"]
    rows = [["x" * 10, "1" * 10, "2" * 10, "3" * 10]]
    assert list(widths(head, rows, 200, ["B"])) == [0, 1, 2, 3]
    assert list(widths(head, rows, 40, ["B"])) == [0, 1, 3]          # 3 columns of 10 + borders = 40
    assert list(widths(head, rows, 30, ["B"])) == [0, 1]
    assert list(widths(head, rows, 5, ["B"])) == [0]                  # the names always stay
    assert text_table(["a", "Size"], [["x", "1.5"], ["yy", "10"]]).splitlines() == [
        "| a  | Size |", "|----|-----:|", "| x  |  1.5 |", "| yy |   10 |"]


@pytest.mark.parametrize("module,args,needle", [
    ("onnxruntime_genai", ["profile=browser"], "export.onnx=fp32 needs the optional ONNX packages "
                                                "(onnxruntime_genai"),
    ("onnxruntime", ["profile=browser"], "(onnxruntime is missing); install them with: pip install 'compress[onnx]'"),
    ("bitsandbytes", ["quantize.bnb=[nf4]"], "pip install 'compress[bnb]'"),
    ("datasets", ["data=someone/chats"], "to use an HF dataset install it with: pip install datasets"),
])
def test_missing_optional_package_stops_before_the_first_stage(module, args, needle, tmp_path):
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            "from compress.cli import main\n"
            f"sys.exit(main(['run', 'name=x', 'out={tmp_path}', *{args!r}]))\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert "\n" not in err and needle in err, err
    assert "▶" not in proc.stdout + proc.stderr and not any(tmp_path.iterdir())   # no stage ran, nothing written
    assert time.time() - t0 < 60
