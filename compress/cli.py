"""Command line: thin; parses arguments and imports the heavy stages lazily.

    compress run profile=phone [key=value ...]   distill, export, quantize, evaluate, report
    compress ls profiles|formats|keys            what can be chosen
    compress report runs/<name>                  rebuild a run's report from its meta files
    compress compare runs/a runs/b [--out DIR]   one table across runs
    compress chat runs/<name> [artifact] [--prompt TEXT] [--max-tokens N] [--threads N]
                                                 talk to an artifact in its own runtime

Bad input prints one line and exits 2; --debug shows the traceback.
"""
from __future__ import annotations

import os
import sys

USAGE = __doc__.split("\n\n")[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    quiet_progress(sys.stderr)
    from .errors import UserError
    try:
        return dispatch(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("error: out of memory; lower distill.batch or distill.seq_len, use a smaller student "
              "(student.layers), or close other programs; finished stages are kept and a re-run resumes",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept and a re-run resumes", file=sys.stderr)
        return 130
    except OSError as e:
        if debug:
            raise
        # disk full, read-only output, permission: say which path and that nothing half-written remains
        print(f"error: {e.strerror or e} ({e.filename or 'output'}); finished stages are kept, "
              f"the unfinished one was discarded: free space or fix permissions and re-run", file=sys.stderr)
        return 2


def quiet_progress(stream) -> None:
    """Libraries' tqdm bars (transformers' GGUF loading, lm-eval, datasets, the hub) write a line
    per update into a file or a pipe, burying compress's stage lines: off unless `stream` is a
    terminal. Every tqdm bar is made in tqdm.std.tqdm.__init__, which is told so even when a
    caller passes disable=False (TQDM_DISABLE alone would not cover those)."""
    if stream.isatty():
        return
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    import tqdm.std as tqdm
    if not getattr(tqdm.tqdm.__init__, "quiet", False):
        init = tqdm.tqdm.__init__

        def quiet_init(self, *args, **kwargs):
            init(self, *args, **(kwargs | {"disable": True}))
        quiet_init.quiet = True
        tqdm.tqdm.__init__ = quiet_init


def dispatch(argv: list[str]) -> int:
    from .errors import UserError, closest
    commands = ["run", "ls", "report", "compare", "chat"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        from .config import load_config
        from .pipeline import run
        cfg = load_config(rest)
        run(cfg)
        return 0
    if cmd == "ls":
        return list_things(rest)
    if cmd == "report":
        if len(rest) != 1:
            raise UserError("usage: compress report runs/<name>")
        from .report import print_table, write
        import json
        paths = write(rest[0])
        with open(paths["json"]) as f:
            print_table(json.load(f), full=str(paths["md"]))
        print("\n".join(f"report: {p}" for k, p in paths.items() if k in ("md", "html")))
        return 0
    if cmd == "compare":
        rest = list(rest)
        out = take_option(rest, "--out", str, "cmp", noun="a directory")
        if len(rest) < 1:
            raise UserError("usage: compress compare runs/a runs/b [--out DIR]")
        from .report.compare import compare
        compare(rest, out)
        return 0
    if cmd == "chat":
        return chat_command(rest)
    raise UserError(f"unknown command '{cmd}'{closest(cmd, commands)}; commands: {', '.join(commands)}")


def take_option(rest: list[str], flag: str, kind=str, example: str = "", noun: str = "a value"):
    """Remove `flag VALUE` from rest and return VALUE (None when absent); a bad one is one line."""
    from .errors import UserError
    if flag not in rest:
        return None
    i = rest.index(flag)
    if i + 1 >= len(rest):
        raise UserError(f"{flag} needs {noun}, e.g. {flag} {example}")
    value = rest[i + 1]
    del rest[i:i + 2]
    try:
        v = kind(value)
    except ValueError:
        raise UserError(f"{flag} takes a whole number, not '{value}', e.g. {flag} {example}") from None
    if kind is int and v < 1:
        raise UserError(f"{flag} must be at least 1, not {v}")
    return v


def chat_command(rest: list[str]) -> int:
    from .errors import UserError
    rest = list(rest)
    if rest and rest[0] in ("-h", "--help"):
        from . import chat
        print(chat.__doc__)
        return 0
    prompt = take_option(rest, "--prompt", str, '"Explain tides."')
    max_tokens = take_option(rest, "--max-tokens", int, "256")
    threads = take_option(rest, "--threads", int, "4")
    flags = [a for a in rest if a.startswith("--")]
    if flags or not 1 <= len(rest) <= 2:
        usage = "usage: compress chat runs/<name> [artifact] [--prompt TEXT] [--max-tokens N] [--threads N]"
        raise UserError(f"unknown option {flags[0]}; {usage}" if flags else usage)
    from .chat import chat
    return chat(rest[0], rest[1] if len(rest) > 1 else None, prompt, threads, max_tokens or 256)


def list_things(rest: list[str]) -> int:
    from .errors import UserError, closest
    what = rest[0] if rest else "profiles"
    if what == "profiles":
        from .config import list_profiles, read_profile
        for name in list_profiles():
            dev = read_profile(name).get("device", {})
            print(f"{name:14s} {dev.get('name', '')}")
    elif what == "formats":
        from .formats import FORMATS, LAYOUTS
        for f in FORMATS.values():
            for kind, types in (("export", f.export), ("quantize", f.quantize)):
                if types:
                    print(f"{kind + '.' + f.name + ':':15s}" + " ".join(f"{t} ({v.bits:g} bits)" for t, v in types.items())
                          + f"   runs in {f.runtime}")
        print("quantize.gguf: also a size target, a llama.cpp type per tensor: auto (budgets.max_size_mb), "
              "auto:80MB, auto:30% (of the unquantized GGUF)")
        print("export.layout: " + " ".join(LAYOUTS))
    elif what == "keys":
        from .config import RunConfig
        from .keys import rows
        for key, default, values, help in rows(RunConfig):
            print(f"{key:33s} {default:18s} {help}" + (f"; {values}" if values else ""))
    else:
        raise UserError(f"unknown listing '{what}'{closest(what, ['profiles', 'formats', 'keys'])}; "
                        f"use: compress ls profiles|formats|keys")
    return 0

