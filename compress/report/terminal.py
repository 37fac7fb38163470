"""Tables on the console: readable in a terminal, in a pipe and in a file.

    show_table(console, "phone (profile phone)", head, rows, styles, full="runs/phone/report.md")

A terminal gets a rich table of the columns that fit its width (whole cells, never folded); the
ones left out are named with where the full table is. A pipe or a file gets every column as an
aligned plain-text table (markdown pipes, no escapes), because rich would wrap it into 80 columns
with every cell broken over several lines.
"""
from __future__ import annotations

# Border and padding a rich column takes besides its text (and one closing border per table).
COLUMN_EXTRA = 3


def _number(cell: str) -> bool:
    try:
        float(cell.replace(",", "").split(" ")[0].rstrip("%×"))
        return True
    except ValueError:
        return False


def is_numeric(head: list[str], rows: list[list[str]], j: int) -> bool:
    """A column of numbers (n/a allowed), right-aligned."""
    cells = [r[j] for r in rows if r[j] not in ("n/a", "", "unavailable")]
    return bool(cells) and all(_number(c) for c in cells)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    """Every column, padded to its widest cell: markdown that also reads as plain text."""
    widths = [max([len(h)] + [len(r[j]) for r in rows]) for j, h in enumerate(head)]
    nums = [is_numeric(head, rows, j) for j in range(len(head))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, nums)) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else "-" * (w + 2) for w, n in zip(widths, nums)) + "|"
    return "\n".join([line(head), rule] + [line(r) for r in rows])


def widths(head: list[str], rows: list[list[str]], width: int, drop_order: list[str]) -> dict[int, int]:
    """{column index: text width} of the columns to show within `width` characters.

    Every column with its header on one line when that fits; else headers wrap at spaces and
    columns go, those named in drop_order first (in that order), then others from the right.
    The first column always stays; cells are never cut.
    """
    cells = [[r[j] for r in rows] for j in range(len(head))]
    wide = {j: max([len(head[j])] + [len(c) for c in cells[j]]) for j in range(len(head))}
    if sum(wide.values()) + COLUMN_EXTRA * len(head) + 1 <= width:
        return wide
    narrow = {j: max([len(w) for w in head[j].split()] + [len(c) for c in cells[j]]) for j in range(len(head))}
    order = [head.index(h) for h in drop_order if h in head]
    order += [j for j in reversed(range(len(head))) if j not in order and j != 0]
    for j in order:
        if sum(narrow.values()) + COLUMN_EXTRA * len(narrow) + 1 <= width:
            break
        del narrow[j]
    return narrow


def show_table(console, title: str, head: list[str], rows: list[list[str]], styles: list, *,
               full: str | None = None, drop_order: list[str] = ()) -> None:
    from rich.table import Table
    from rich.text import Text
    if not console.is_terminal:
        console.file.write(f"\n{title}\n\n{text_table(head, rows)}\n\n")
        console.file.flush()
        return
    keep = widths(head, rows, console.width, list(drop_order))
    t = Table(title=Text(title), header_style="bold")
    for j, w in keep.items():
        t.add_column(Text(head[j]), justify="right" if is_numeric(head, rows, j) else "left", width=w)
    for cells, style in zip(rows, styles):
        # Text objects, not strings: rich would otherwise read '[...]' in a name as markup.
        t.add_row(*[Text(cells[j]) for j in keep], style=style)
    console.print(t)
    hidden = [head[j] for j in range(len(head)) if j not in keep]
    if hidden:
        where = f": the full table is in {full}" if full else ""
        console.print(Text(f"({len(hidden)} columns left out to fit this terminal: {', '.join(hidden)}{where})",
                           style="dim"))
