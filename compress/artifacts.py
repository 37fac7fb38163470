"""Artifact directories: weights plus a meta.json that says how they were made.

An artifact is written into a temporary sibling (`.<name>.tmp-<pid>`) and renamed into place only
when complete, so a crash never leaves a directory that looks finished. A stage whose expected
hash (stage + its config + its parents' hashes) matches an existing artifact is skipped.

meta.json keys (all artifacts):
    name, stage, format (hf|gguf|data|eval|onnx|...), quant, file (main file, relative), parents
    (list of {name, hash, path}), parent (first parent's name or null), config (the values of the
    config keys the stage declares, plus its params), hash, versions, created, size_bytes, params,
    metrics (stage-specific), cost ({wall_s, device, peak_rss_mb, peak_gpu_mb} of the stage that
    made it; null for artifacts written outside a stage).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

META = "meta.json"


@dataclass
class Artifact:
    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def hash(self) -> str:
        return self.meta["hash"]

    @property
    def file(self) -> Path:
        """The main file (model.gguf) or, for HF/data artifacts, the directory itself."""
        return self.path / self.meta.get("file", ".")


def load(path) -> Artifact:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise UserError(f"{path} is not a finished artifact (no {META}); re-run the stage that makes it")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is corrupt ({e}); delete {path} and re-run") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path} is corrupt (not a JSON object); delete {path} and re-run")
    # The main file must stay inside the artifact: a tampered meta.json must not point elsewhere.
    file = str(meta.get("file") or ".")
    if Path(file).is_absolute() or ".." in Path(file).parts:
        raise UserError(f"{meta_path} names file '{file}' outside its directory; delete {path} and re-run")
    return Artifact(path, meta)


def expected_hash(stage: str, config: dict, parents: list[Artifact | None], code: str = "") -> str:
    """Identity of an artifact: what made it (stage, config, the stage's code digest) and from what.
    Stable across runs and machines."""
    what = {"stage": stage, "config": config, "parents": [p.hash if p else None for p in parents]}
    if code:
        what["code"] = code
    blob = json.dumps(what, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_done(out: Path, want: str) -> Artifact | None:
    """The finished artifact at `out` if its identity is `want` (expected_hash, Identity.hash)."""
    if not (out / META).is_file():
        return None
    art = load(out)
    if art.meta.get("hash") != want:
        return None
    # A main file that changed size after it was finished (truncated copy, disk error) is redone.
    file = art.meta.get("file", ".")
    if file != "." and (not art.file.is_file() or file_size(art.file) != art.meta.get("size_bytes")):
        return None
    return art


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for pkg in ("compress", "torch", "transformers", "gguf", "llama-cpp-python", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def file_size(path: Path) -> int:
    """A weights file's size, with the external-data file an ONNX graph keeps beside it."""
    data = path.with_name(path.name + "_data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


@contextlib.contextmanager
def writing(out, *, stage: str | None = None, config: dict | None = None, parents: list | None = None,
            format: str | None = None, quant: str | None = None, file: str = ".", force: bool = True):
    """Yield (tmp_dir, meta) to fill; on success write meta.json and rename tmp_dir to `out`.

    Inside a declared stage (compress/stage.py) the stage name, config, parents and format come
    from the stage's identity and the meta records what making it cost; outside one (tests) the
    caller names them. The caller puts files into tmp_dir and may add to meta["metrics"] /
    meta["params"]. On any exception the temporary directory is removed and nothing at `out`
    changes. An existing `out` is replaced only when `force` (the pipeline decides; stages never
    overwrite by themselves).
    """
    from .stage import cost, current
    ident = current()
    if ident is not None:
        if stage is not None or config is not None or parents is not None:
            raise TypeError(f"stage {ident.stage}: the runner records stage, config and parents; do not pass them")
        stage, config, parents, format = ident.stage, ident.config, ident.parents, format or ident.format
    code = ident.code if ident is not None else ""
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} exists and was made differently; pass force=true to redo it or choose another name=")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    parents = [p for p in parents or [] if p is not None]
    meta = {
        "name": out.name, "stage": stage, "format": format, "quant": quant, "file": file,
        "parent": parents[0].name if parents else None,
        "parents": [{"name": p.name, "hash": p.hash, "path": str(p.path)} for p in parents],
        "config": config, "code": code or None, "hash": expected_hash(stage, config, parents, code),
        "versions": library_versions(), "params": None, "metrics": {},
    }
    try:
        yield tmp, meta
        meta["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        meta["cost"] = cost(ident) if ident is not None else None
        meta["size_bytes"] = file_size(tmp / file) if file != "." else dir_size(tmp)
        _write_json_atomic(tmp / META, meta)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return None


def _swap_into_place(tmp: Path, out: Path) -> None:
    # rename is atomic; an old artifact is moved aside first and removed only after the swap.
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)


def write_json_atomic(path, obj) -> None:
    _write_json_atomic(Path(path), obj)


def clean_stale(run_dir: Path) -> None:
    """Remove temporary siblings left by a killed process (they never look finished)."""
    for p in Path(run_dir).glob(".*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(".*.old-*"):
        shutil.rmtree(p, ignore_errors=True)
