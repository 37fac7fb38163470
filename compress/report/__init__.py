"""Report: a pure function of a run directory's meta.json files (no stage imports this package).

    from compress.report import build, write, print_table, compare
    paths = write("runs/phone-20250101-120000")   # report.json, report.md, report.html, size_quality.png
    print_table(build("runs/phone-20250101-120000"))
    compare(["runs/a", "runs/b"], out_dir=".")    # compare.md, compare.html; prints one table

rich and matplotlib are imported only when a table is printed or a plot is drawn.
"""
from .build import build
from .compare import compare
from .render import print_table, write

__all__ = ["build", "write", "print_table", "compare"]
