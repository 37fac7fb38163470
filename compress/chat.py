"""`compress chat`: talk to any artifact of a run in the runtime it ships in.

    compress chat runs/phone                      # the recommended artifact, interactive
    compress chat runs/phone gguf-Q4_K_M          # a named one
    compress chat runs/phone onnx-int4 --prompt "Explain tides."   # answer once and exit

GGUF runs in llama.cpp, ONNX in onnxruntime, HF directories in torch (runtimes.py), always with
the teacher's tokenizer and chat template, greedy. Answers stream to stdout; tokens and tokens/s
go to stderr after each answer, so `--prompt` output can be piped. In the interactive loop
/reset forgets the conversation and /exit (or Ctrl-D) leaves.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import UserError, closest

MAX_CONTEXT = 2048   # tokens of conversation kept (the oldest turns go first)


def model_artifacts(run_dir: Path) -> dict:
    """{name: meta} of the run's finished model artifacts that a runtime can run."""
    from .formats import RUNTIMES
    from .report.build import read_artifact_metas
    return {n: m for n, m in read_artifact_metas(run_dir, []).items() if m.get("format") in RUNTIMES}


def pick(run_dir: Path, name: str | None) -> str:
    """The artifact to chat with: the named one, else the report's recommendation."""
    from .report.build import read_run_meta
    read_run_meta(run_dir)   # a clear line when this is not a run directory
    names = model_artifacts(run_dir)
    listing = ", ".join(names) or "none yet"
    if name is None:
        report = run_dir / "report.json"
        rec = json.loads(report.read_text()).get("recommended") if report.is_file() else None
        if rec not in names:
            raise UserError(f"{run_dir} has no recommended artifact yet; name one: compress chat {run_dir} "
                            f"<artifact> (artifacts: {listing})")
        return rec
    if name not in names:
        raise UserError(f"{run_dir} has no artifact '{name}'{closest(name, list(names))}; artifacts: {listing}")
    return name


class Session:
    """One artifact, opened once, answering a conversation turn by turn."""

    def __init__(self, run_dir: Path, name: str, threads: int, max_tokens: int):
        from . import artifacts
        from .evaluate.generate import stop_ids
        from .evaluate.runtimes import open_runtime
        from .models import load_tokenizer, positions
        teacher = run_dir / "teacher"
        if not (teacher / "meta.json").is_file():
            raise UserError(f"{run_dir} has no teacher artifact (its tokenizer and chat template are needed); "
                            f"re-run compress run to make it")
        self.tok = load_tokenizer(str(teacher))
        self.stops, self.max_tokens = stop_ids(self.tok), max_tokens
        self.n_ctx = positions(teacher, MAX_CONTEXT)
        if max_tokens >= self.n_ctx:
            raise UserError(f"--max-tokens {max_tokens} leaves no room for a prompt in the {self.n_ctx}-token "
                            f"context; use fewer than {self.n_ctx}")
        self.art = artifacts.load(run_dir / name)
        self.rt = open_runtime(self.art, threads, vocab=len(self.tok), n_ctx=self.n_ctx, all_logits=False)
        self.history: list[dict] = []

    def prompt_ids(self) -> list[int]:
        """The conversation's ids, dropping the oldest exchanges until an answer still fits."""
        from .evaluate.generate import chat_ids
        room = self.n_ctx - self.max_tokens
        while True:
            ids = chat_ids(self.tok, self.history)
            if len(ids) <= room:
                return ids
            if len(self.history) <= 1:
                self.history = []
                raise UserError(f"the prompt is {len(ids)} tokens; the {self.n_ctx}-token context leaves {room} "
                                f"with --max-tokens {self.max_tokens}: shorten it or lower --max-tokens")
            self.history = self.history[2:]

    def answer(self, text: str, out=None, err=None) -> str:
        """Stream one answer to `out` (stdout); tokens and speed to `err` (stderr); the answer joins
        the history."""
        from .evaluate.generate import TextStream, greedy
        out, err = out or sys.stdout, err or sys.stderr
        self.history.append({"role": "user", "content": text})
        stream = TextStream(self.tok)

        def show(token):
            out.write(stream.add(token))
            out.flush()
        a = greedy(self.rt, self.prompt_ids(), self.max_tokens, self.stops, on_token=show)
        reply = stream.text()
        out.write(reply[stream.shown:] + "\n")   # a tail held back for an incomplete character
        out.flush()
        tps = len(a.ids) / a.seconds if a.seconds > 0 else 0.0
        stop = "" if a.finished else f", stopped at --max-tokens {self.max_tokens}"
        err.write(f"[{self.art.name} in {self.rt.name}: {len(a.ids)} tokens, {tps:.1f} tok/s{stop}]\n")
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def close(self) -> None:
        self.rt.close()


def chat(run_dir, name: str | None = None, prompt: str | None = None, threads: int | None = None,
         max_tokens: int = 256) -> int:
    from .config import host_cores
    run_dir = Path(run_dir)
    name = pick(run_dir, name)
    session = Session(run_dir, name, threads or host_cores(), max_tokens)
    try:
        if prompt is not None:
            session.answer(prompt)
            return 0
        print(f"chatting with {name} in {session.rt.name}; /reset forgets, /exit or Ctrl-D leaves", file=sys.stderr)
        while True:
            try:
                text = input("> ").strip()
            except (EOFError, KeyboardInterrupt):   # Ctrl-D or Ctrl-C at the prompt: leave
                print(file=sys.stderr)
                return 0
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                session.history = []
                continue
            if text:
                try:
                    session.answer(text)
                except KeyboardInterrupt:   # Ctrl-C stops this answer, not the chat
                    session.history = session.history[:-1]
                    print("\n[stopped]", file=sys.stderr)
                except UserError as e:      # a turn too long for the context: say so, keep chatting
                    print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    except BrokenPipeError:   # `compress chat ... --prompt ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0
    finally:
        session.close()
