"""Config keys described once: each dataclass field carries its help, its choices and its range.

    lr: float = key(2e-4, "peak learning rate (AdamW)", gt=0, lt=1)

`check_key` validates a value from that metadata, `rows` feeds `compress ls keys` and README's
key table (config.keys_markdown), so the help, the checks and the docs cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import operator

from .errors import UserError, closest

# bound name -> (test the value must pass, how it reads)
BOUNDS = {"ge": (operator.ge, ">="), "gt": (operator.gt, ">"), "le": (operator.le, "<="), "lt": (operator.lt, "<")}


def key(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None):
    """A dataclass field with its documentation and limits; a list default is copied per instance.

    choices: the valid values (for a list key: of each element); ge/gt/le/lt: closed/open bounds.
    """
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def walk(cls, prefix: str = ""):
    """(dotted key, field) for every key of a config dataclass and its sections, in order."""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):   # a section: device, distill, ...
            yield from walk(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def show(value) -> str:
    """A value as it is written on the command line: null, true, [a,b]."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(show(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


def range_text(meta) -> str:
    """'in [0, 1)', '> 0', '>= 8' or '' from a field's bounds."""
    lo = next((b for b in ("ge", "gt") if meta.get(b) is not None), None)
    hi = next((b for b in ("le", "lt") if meta.get(b) is not None), None)
    if lo and hi:
        return f"in {'[' if lo == 'ge' else '('}{meta[lo]:g}, {meta[hi]:g}{']' if hi == 'le' else ')'}"
    bound = lo or hi
    return f"{BOUNDS[bound][1]} {meta[bound]:g}" if bound else ""


def values_text(f, code: str = "") -> str:
    """What a key takes: its choices ('one of' a scalar, 'any of' for a list) or its range."""
    choices = f.metadata.get("choices")
    if choices is None:
        return range_text(f.metadata)
    listed = ", ".join(f"{code}{c}{code}" for c in choices)
    return ("any of " if "list" in str(f.type) else "one of ") + listed


def check_key(name: str, f, value, wording: str | None = None) -> None:
    """One-line UserError when `value` is not among the field's choices or outside its range.

    wording: a message to use instead of the generic one, with {key}, {value}, {range} and
    {choices} ('a, b or c') filled in.
    """
    meta = f.metadata
    choices, rng = meta.get("choices"), range_text(meta)
    if value is None or not (choices or rng):
        return
    fill = dict(key=name, value=show(value), range=rng, choices=_or(choices or ()))
    for v in (value if isinstance(value, list) else [value]) if choices else ():
        if v in choices:
            continue
        hint, valid = closest(v, choices), ", ".join(map(str, choices))
        if wording:
            raise UserError(wording.format(**fill))
        if isinstance(value, list):
            raise UserError(f"{name} lists {v!r}{hint}; it takes {valid}")
        # the close one, else the default (a safe choice), else the first
        best = next((c for c in choices if f"'{c}'" in hint), default(f) if default(f) in choices else choices[0])
        raise UserError(f"{name}={v!r}{hint}; it takes {valid}: use {name}={best}")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if numeric and not all(meta.get(b) is None or test(value, meta[b]) for b, (test, _) in BOUNDS.items()):
        if wording:
            raise UserError(wording.format(**fill))
        example = f", e.g. {name}={show(default(f))}" if default(f) is not None else ""
        raise UserError(f"{name}={show(value)} is out of range; {name} must be {rng}{example}")


def _or(items) -> str:
    """'a, b or c'."""
    items = [str(i) for i in items]
    return " or ".join([", ".join(items[:-1]), items[-1]]) if len(items) > 1 else "".join(items)


def rows(cls, code: str = ""):
    """(key, default, values, help) for every key: `compress ls keys` and README's table."""
    for name, f in walk(cls):
        yield name, show(default(f)), values_text(f, code), f.metadata.get("help", "")


def markdown(cls) -> str:
    """The key table in README's "Configuration keys" section."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")
    lines = ["| key | default | values | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {cell(v)} | {cell(h)} |" for k, d, v, h in rows(cls, code="`")]
    return "\n".join(lines) + "\n"
