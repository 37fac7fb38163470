"""One tradeoff table across several runs: `compress compare runs/a runs/b`.

    from compress.report.compare import compare
    result = compare(["runs/a", "runs/b"], out_dir=".")   # prints the table; writes compare.md/.html

Artifact names are prefixed by their run ("a/gguf-Q4_K_M"). Each run keeps its own recommended
pick (its profile's budgets); the Pareto marks are recomputed across all compared artifacts.
"""
from __future__ import annotations

import copy
import html
from pathlib import Path

from ..errors import UserError
from .build import build, mark_pareto
from .plot import size_quality_png
from .render import (DROP_ORDER, LEGEND, headers, html_page, html_table, img_tag, md_cell, md_table, plot_points,
                     row, row_style, write_atomic)

COMPARE_LEGEND = LEGEND.replace("★ recommended for the profile.", "★ recommended by its own run's profile.") + \
    " Pareto here is across every compared artifact."


def _labels(reports: list[dict]) -> list[str]:
    """Run labels, made unique when two directories hold runs of the same name."""
    out, seen = [], {}
    for r in reports:
        n = seen[r["run"]] = seen.get(r["run"], 0) + 1
        out.append(r["run"] if n == 1 else f"{r['run']}#{n}")
    return out


def _run_line(label: str, r: dict) -> str:
    d = r["device"]
    b = ", ".join(f"{k}={v:g}" for k, v in r["budgets"].items() if v is not None) or "none"
    return (f"{label}: profile {r.get('profile') or 'default'}, device {d.get('name')} "
            f"({d.get('bandwidth_gbs')} GB/s), budgets {b}; recommended {r.get('recommended') or 'none'} "
            f"— {r['recommendation_reason']}")


def compare(run_dirs, out_dir=None, console=None) -> dict:
    """Build every run's report, merge them into one table, print it, and write compare.md/.html."""
    if not run_dirs:
        raise UserError("compare needs at least one run directory, e.g. compress compare runs/a runs/b")
    reports = []
    for d in run_dirs:
        if not Path(d).is_dir():
            raise UserError(f"{d} is not a run directory (it does not exist); pass directories made by "
                            f"`compress run`, e.g. runs/<name>")
        reports.append(build(d))   # raises UserError naming the path when it is not a run
    labels = _labels(reports)
    arts, names = [], []
    for label, r in zip(labels, reports):
        for a in r["artifacts"]:
            a = copy.deepcopy(a)
            a["run"] = label
            arts.append(a)
            names.append(f"{label}/{a['name']}")
    mark_pareto(arts)   # across runs: which artifact wins regardless of which run made it

    head = headers()
    rows = [row(a, n) for a, n in zip(arts, names)]
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "compare.md", "html": out_dir / "compare.html"}
    run_lines = [_run_line(lbl, r) for lbl, r in zip(labels, reports)]

    md = ["# Compare: " + md_cell(", ".join(labels)), ""]
    md += [f"- {md_cell(x)}" for x in run_lines] + ["", md_table(head, rows), "", md_cell(COMPARE_LEGEND), ""]
    write_atomic(paths["md"], "\n".join(md))

    points = []
    for label in labels:
        sel = [(a, n) for a, n in zip(arts, names) if a["run"] == label]
        points += plot_points([a for a, _ in sel], group=label, labels=[n for _, n in sel])
    png = size_quality_png(points, title="size vs quality: " + ", ".join(labels))
    e = html.escape
    body = ["<h1>Compare: " + e(", ".join(labels)) + "</h1>",
            "<ul>" + "".join(f"<li>{e(x)}</li>" for x in run_lines) + "</ul>",
            html_table(head, arts, names), f'<p class="est">{e(COMPARE_LEGEND)}</p>', img_tag(png)]
    write_atomic(paths["html"], html_page("Compare: " + ", ".join(labels), "\n".join(body)))

    from rich.console import Console
    from rich.text import Text
    from .terminal import show_table
    console = console or Console()
    show_table(console, "compare: " + ", ".join(labels), head, rows, [row_style(a) for a in arts],
               full=str(paths["md"]), drop_order=DROP_ORDER)
    for x in run_lines:
        console.print(Text(x))
    return {
        "runs": [{"label": lbl, "run": r["run"], "profile": r.get("profile"), "device": r["device"],
                  "budgets": r["budgets"], "recommended": r["recommended"],
                  "recommendation_reason": r["recommendation_reason"]} for lbl, r in zip(labels, reports)],
        "artifacts": [a | {"name": n, "artifact": a["name"]} for a, n in zip(arts, names)],
        "paths": paths,
    }
