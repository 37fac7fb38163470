"""Render a report: report.json, report.md, report.html (plot embedded), size_quality.png, terminal.

    from compress.report import write, print_table
    paths = write("runs/phone-20250101-120000")   # {"json": ..., "md": ..., "html": ..., "png": ...}
    print_table(json.load(open(paths["json"])))

Every file is written to a temporary sibling and renamed into place. In HTML every piece of
text that came from a user or a model (names, paths, profile, commands) is escaped.
"""
from __future__ import annotations

import base64
import html
import json
import os
import re
from pathlib import Path

from .build import build, fmt_num
from .plot import size_quality_png
from .samples import samples_html, samples_markdown
from .tables import extra_tables

# ---------------------------------------------------------------- the one table

HEADERS = ["Artifact", "Format (runtime)", "Size MB", "Params", "PPL", "KLD", "Top-1", "Threads",
           "Host prefill tok/s", "Host decode tok/s", "Peak RSS MB", "Est. device decode tok/s",
           "Budget", "Pareto"]


def row(a: dict, label: str | None = None) -> list[str]:
    """One artifact as table cells (plain text); same cells for markdown, HTML and the terminal."""
    q, s = a["quality"], a["speed"]
    b = a["budget"]
    budget = {True: "pass", False: "FAIL", None: "unchecked"}[b["pass"]]
    name = label or a["name"]
    name += " (teacher)" if a.get("teacher") and a["name"] != "teacher" else ""
    name += " ★" if a.get("recommended") else ""
    return [
        name,
        " ".join(x for x in (a.get("format"), a.get("quant")) if x)
        + (f" ({a['runtime']})" if a.get("runtime") else ""),
        fmt_num(a["size_mb"]),
        _params(a["params"]),
        fmt_num(q["ppl"]),
        fmt_num(q["kld"]),
        "n/a" if q["top1"] is None else f"{100 * q['top1']:.1f}%",
        "n/a" if s["threads"] is None else str(s["threads"]),
        fmt_num(s["prefill_tps"]),
        fmt_num(s["decode_tps"]),
        fmt_num(a["memory"]["peak_rss_mb"]),
        fmt_num(a["estimate"]["decode_tps"]),
        budget,
        "yes" if a.get("pareto") else "",
    ]


def headers(device_name: str | None = None) -> list[str]:
    h = list(HEADERS)
    if device_name:
        h[HEADERS.index("Est. device decode tok/s")] = f"Est. {device_name} decode tok/s"
    return h


def _params(n) -> str:
    if not n:
        return "n/a"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def commands(a: dict) -> list[str]:
    r = a.get("run") or {}
    return [r[k] for k in ("llama_cpp", "ollama", "onnxruntime_genai", "onnxruntime", "python") if r.get(k)]


# ---------------------------------------------------------------- markdown

def md_cell(text: str) -> str:
    # Backslash-escape markdown punctuation so names cannot break the table or inject markup.
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", str(text))


def md_table(head: list[str], rows: list[list[str]], numeric=range(2, 12)) -> str:
    lines = ["| " + " | ".join(md_cell(h) for h in head) + " |",
             "|" + "|".join("---:" if i in numeric else "---" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so a command can never close it early.
    n = max([3] + [len(m) + 1 for m in re.findall(r"`+", text)])
    return f"{'`' * n}sh\n{text}\n{'`' * n}"


def _facts(report: dict) -> list[str]:
    d, b, h = report["device"], report["budgets"], report["host"]
    set_b = ", ".join(f"{k}={v:g}" for k, v in b.items() if v is not None) or "none"
    return [
        f"Profile: {report.get('profile') or 'default'}",
        f"Device (target): {d.get('name')} — {d.get('threads')} threads, {d.get('ram_mb')} MB RAM, "
        f"{d.get('bandwidth_gbs')} GB/s, {d.get('compute_gflops')} GFLOP/s",
        f"Budgets: {set_b}",
        f"Host (measured on): {h.get('cpu') or 'unknown CPU'}, {h.get('cores') or '?'} cores, "
        f"{h.get('threads')} threads",
    ]


LEGEND = ("★ recommended for the profile. Pareto: no other artifact is both smaller and closer to the "
          "teacher. PPL/KLD/Top-1 are measured on held-out data against the teacher (KLD in nats/token, "
          "top-1 = agreement with the teacher's next token). Host columns are measured on this machine "
          "in each artifact's own runtime. 'Est. device' columns are estimates from the profile's device "
          "facts (bandwidth / weight bytes), not measurements.")


def to_markdown(report: dict, png_name: str | None = "size_quality.png") -> str:
    arts = report["artifacts"]
    out = [f"# Report: {md_cell(report['run'])}", ""]
    out += [f"- {md_cell(f)}" for f in _facts(report)] + [""]
    rec = report.get("recommended")
    out += [f"**Recommended:** {md_cell(rec) if rec else 'none'} — {md_cell(report['recommendation_reason'])}", ""]
    out += [md_table(headers(report["device"].get("name")), [row(a) for a in arts]), "", md_cell(LEGEND), ""]
    if png_name:
        out += [f"![size vs quality]({png_name})", ""]
    for title, head, rows, note in extra_tables(report):
        first = 2 if "Recipe" in head else 1   # columns after the names hold numbers
        out += [f"## {md_cell(title)}", "", md_table(head, rows, numeric=range(first, len(head))), "", md_cell(note), ""]
    if report.get("samples"):
        out += samples_markdown(report["samples"], md_cell)
    fails = [a for a in arts if a["budget"]["failed"] or a["budget"]["unchecked"]]
    if fails:
        out += ["## Budget checks", ""]
        out += [f"- {md_cell(a['name'])}: {md_cell('; '.join(a['budget']['failed'] + a['budget']['unchecked']))}"
                for a in fails] + [""]
    out += ["## Estimates", ""]
    out += [f"- {md_cell(a['name'])}: decode ≈ {fmt_num(a['estimate']['decode_tps'])} tok/s "
            f"({md_cell(a['estimate']['basis']['decode_tps'])}); prefill ≈ "
            f"{fmt_num(a['estimate']['prefill_tps'])} tok/s ({md_cell(a['estimate']['basis']['prefill_tps'])})"
            for a in arts] + [""]
    out += ["## How to run", ""]
    for a in arts:
        cmds = commands(a)
        if cmds:
            out += [f"**{md_cell(a['name'])}**", "", _fence("\n".join(cmds)), ""]
    if report.get("warnings"):
        out += ["## Warnings", ""] + [f"- {md_cell(w)}" for w in report["warnings"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px}
td.num{text-align:right}tr.rec{background:#e6f7e6;font-weight:bold}tr.fail td.budget{color:#b00}
tr.teacher{color:#666}code,pre{background:#f4f4f4}pre{padding:6px;overflow-x:auto}
.est{color:#555;font-style:italic}img{max-width:100%}
td.answer{white-space:pre-wrap;max-width:60em}mark{background:#fde8a8}"""


def html_table(head: list[str], arts: list[dict], labels: list[str] | None = None) -> str:
    e = html.escape
    rows = []
    for i, a in enumerate(arts):
        cls = " ".join(c for c, on in (("rec", a.get("recommended")), ("fail", a["budget"]["pass"] is False),
                                        ("teacher", a.get("teacher"))) if on)
        cells = row(a, labels[i] if labels else None)
        why = "; ".join(a["budget"]["failed"] + a["budget"]["unchecked"])
        tds = []
        for j, c in enumerate(cells):
            kind = "budget" if head[j] == "Budget" else ("num" if 2 <= j <= 11 else "")
            title = f' title="{e(why)}"' if kind == "budget" and why else ""
            tds.append(f'<td class="{kind}"{title}>{e(c)}</td>')
        rows.append(f'<tr class="{cls}">' + "".join(tds) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def plain_html_table(head: list[str], rows: list[list[str]]) -> str:
    e = html.escape
    return ("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f'<td class="{"num" if j else ""}">{e(c)}</td>' for j, c in enumerate(r))
                      + "</tr>" for r in rows) + "</tbody></table>")


def html_page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>\n")


def img_tag(png: bytes | None) -> str:
    if not png:
        return ""
    return f'<p><img alt="size vs quality" src="data:image/png;base64,{base64.b64encode(png).decode()}"></p>'


def to_html(report: dict, png: bytes | None) -> str:
    e = html.escape
    arts = report["artifacts"]
    rec = report.get("recommended")
    body = [f"<h1>Report: {e(report['run'])}</h1>", "<ul>" + "".join(f"<li>{e(f)}</li>" for f in _facts(report)) + "</ul>",
            f"<p><b>Recommended:</b> {e(rec) if rec else 'none'} — {e(report['recommendation_reason'])}</p>",
            html_table(headers(report["device"].get("name")), arts), f'<p class="est">{e(LEGEND)}</p>', img_tag(png)]
    for title, head, rows, note in extra_tables(report):
        body.append(f"<h2>{e(title)}</h2>" + plain_html_table(head, rows) + f'<p class="est">{e(note)}</p>')
    if report.get("samples"):
        body.append(samples_html(report["samples"]))
    fails = [a for a in arts if a["budget"]["failed"] or a["budget"]["unchecked"]]
    if fails:
        body.append("<h2>Budget checks</h2><ul>" + "".join(
            f"<li>{e(a['name'])}: {e('; '.join(a['budget']['failed'] + a['budget']['unchecked']))}</li>"
            for a in fails) + "</ul>")
    body.append('<h2>Estimates</h2><ul class="est">' + "".join(
        f"<li>{e(a['name'])}: decode ≈ {e(fmt_num(a['estimate']['decode_tps']))} tok/s "
        f"({e(a['estimate']['basis']['decode_tps'])}); prefill ≈ {e(fmt_num(a['estimate']['prefill_tps']))} tok/s "
        f"({e(a['estimate']['basis']['prefill_tps'])})</li>" for a in arts) + "</ul>")
    body.append("<h2>How to run</h2>" + "".join(
        f"<h3>{e(a['name'])}</h3><pre><code>{e(chr(10).join(commands(a)))}</code></pre>"
        for a in arts if commands(a)))
    if report.get("warnings"):
        body.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in report["warnings"]) + "</ul>")
    return html_page(f"Report: {report['run']}", "\n".join(body))


# ---------------------------------------------------------------- plot points, files, terminal

def plot_points(arts: list[dict], group: str | None = None, labels: list[str] | None = None) -> list[dict]:
    return [{"label": labels[i] if labels else a["name"], "size_mb": a["size_mb"], "kld": a["quality"]["kld"],
             "pareto": a.get("pareto"), "recommended": a.get("recommended"), "group": group}
            for i, a in enumerate(arts)]


def write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write(run_dir) -> dict:
    """Build the report for runs/<name>/ and write its four files there; returns their paths."""
    run_dir = Path(run_dir)
    report = build(run_dir)
    png = size_quality_png(plot_points(report["artifacts"]), title=f"{report['run']}: size vs quality",
                           max_size_mb=report["budgets"].get("max_size_mb"), max_kld=report["budgets"].get("max_kld"))
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md",
             "html": run_dir / "report.html", "png": run_dir / "size_quality.png"}
    write_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    write_atomic(paths["png"], png)
    write_atomic(paths["md"], to_markdown(report, paths["png"].name))
    write_atomic(paths["html"], to_html(report, png))
    return paths


def row_style(a: dict) -> str | None:
    return "bold green" if a.get("recommended") else ("dim" if a.get("teacher") else None)


# Columns a narrow terminal loses first (the full table is one report.md away).
DROP_ORDER = ["Params", "Threads", "Pareto", "Host prefill tok/s", "Peak RSS MB", "Format (runtime)", "Top-1",
              "PPL", "Budget", "Recipe", "Cost to make", "Task retention", "OOD KLD", "PPL ×", "Decode ×faster",
              "Size ×smaller"]


def print_table(report: dict, console=None, full: str = "report.md") -> None:
    """The tradeoff table for the console, then the pick and why (see terminal.show_table)."""
    from rich.console import Console
    from rich.text import Text
    from .terminal import show_table
    console = console or Console()
    arts = report["artifacts"]
    head = headers(report["device"].get("name"))
    drop = DROP_ORDER + [h for h in head if h.startswith("Est. ")]
    show_table(console, f"{report['run']} (profile {report.get('profile') or 'default'})", head,
               [row(a) for a in arts], [row_style(a) for a in arts], full=full, drop_order=drop)
    for title, head, rows, _ in extra_tables(report):
        if title != "Robustness: in-domain vs out-of-domain":   # kept to the files: the console stays short
            show_table(console, title, head, rows, [None] * len(rows), full=full, drop_order=DROP_ORDER)
    rec = report.get("recommended")
    console.print(Text(f"Recommended: {rec or 'none'} — {report['recommendation_reason']}",
                       style="bold" if rec else "yellow"))
    for a in arts:
        if a.get("recommended"):
            for c in commands(a):
                console.print(Text(f"  {c}"))
    for w in report.get("warnings") or []:
        console.print(Text(f"warning: {w}", style="yellow"))
