"""The stage contract: a stage declares its name, its named inputs and the config keys it reads.

    @stage("export", inputs=("teacher",), reads=("export.gguf",), format="gguf")
    def run(cfg, src, out, *, teacher=None) -> Artifact: ...

Calling a declared stage (from the pipeline's runner or directly, as tests do) goes through one
wrapper that
- hands the stage a view of the run config holding only the declared keys: reading any other key
  raises UndeclaredKey (a stage called from a stage may read only keys its caller declared), so
  config a stage reads is in its identity; files named by a key (data=, a local teacher) are
  identified by that path, not their content;
- computes the artifact's identity from exactly those keys (plus per-call `params` such as the
  quantized type), the hashes of its parents (`src` and the declared inputs, in that order) and a
  digest of the stage's code (the source files of the package it lives in, so an upgraded or
  edited stage redoes its artifacts instead of reusing what older code made), which
  `artifacts.writing` records: stages never name their own config or parents;
- times the stage and records its wall time, device and peak memory in the artifact's meta
  (`meta["cost"]`), so the report can show what each artifact cost to make.

`reads` holds keys ("gen.heldout") or whole sections ("distill"); it may be a function of the
config when a key matters only in some modes (the data stage reads gen.* only when it generates).
"""
from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class UndeclaredKey(RuntimeError):
    """A stage read a config key it does not declare: a bug in the stage, not user input.

    Not an AttributeError, so hasattr()/getattr(view, key, default) cannot swallow it."""


# Where outputs go, not what they are: a stage may always read these.
LOCATIONS = ("run_dir", "name", "out")


@dataclass(frozen=True)
class Stage:
    name: str                                   # the stage name `stages=[...]` takes
    inputs: tuple = ()                          # named artifact inputs after src, in parent order
    reads: tuple | Callable = ()                # config keys or sections, or cfg -> keys
    params: tuple = ()                          # per-call values hashed with the config (e.g. qtype)
    format: str | None = None                   # what the artifact is: hf, gguf, onnx, data, eval, ...
    extra: Callable | None = None               # view -> dict: derived facts that belong in the hash
    module: str = ""                            # the module that defines the stage (its code digest)

    def keys(self, cfg) -> tuple:
        keys = self.reads(_root(cfg)) if callable(self.reads) else self.reads
        return tuple(sorted(set(keys)))

    def identity(self, cfg, src=None, **kwargs) -> Identity:
        """What the artifact is made of: the declared config values, params and parents."""
        keys = self.keys(cfg)
        view = ConfigView(_root(cfg), keys, self.name)
        config = {k: _plain(view._get(k)) for k in keys}
        config.update({p: kwargs.get(p) for p in self.params})
        if self.extra is not None:
            config.update(self.extra(view, **{p: kwargs.get(p) for p in self.params}))
        parents = _flatten([src, *(kwargs.get(name) for name in self.inputs)])
        return Identity(self.name, keys, config, parents, self.format, code_digest(self.module))


@dataclass
class Identity:
    stage: str
    keys: tuple      # the config keys the stage declares for this config
    config: dict
    parents: list
    format: str | None
    code: str = ""   # digest of the stage's source (code_digest)
    started: float = field(default_factory=time.time)
    gpu_base: int = 0   # CUDA bytes allocated when the stage started (tensors of earlier stages)

    @property
    def hash(self) -> str:
        from .artifacts import expected_hash
        return expected_hash(self.stage, self.config, self.parents, self.code)


_current: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("stage", default=None)


def current() -> Identity | None:
    """The identity of the stage running now (read by artifacts.writing), None outside a stage."""
    return _current.get()


def stage(name: str, *, inputs=(), reads=(), params=(), format=None, extra=None):
    """Declare `run(cfg, src, out, **inputs_and_params)` as a stage; see the module docstring."""
    def wrap(fn):
        spec = Stage(name, tuple(inputs), reads if callable(reads) else tuple(reads), tuple(params),
                     format, extra, fn.__module__)

        @functools.wraps(fn)
        def run(cfg, src, out, **kwargs):
            unknown = set(kwargs) - set(spec.inputs) - set(spec.params)
            if unknown:
                raise TypeError(f"stage {name} takes inputs {spec.inputs} and params {spec.params}, "
                                f"not {sorted(unknown)}")
            ident = spec.identity(cfg, src, **kwargs)
            if isinstance(cfg, ConfigView):   # a stage calling a stage: only keys the caller declared
                for k in ident.keys:
                    cfg._check(k)
            view = ConfigView(_root(cfg), ident.keys, name)
            outer = _current.get()
            token = _current.set(ident)
            # a nested stage does not reset the peaks: they belong to the stage that called it
            ident.gpu_base = reset_peaks() if outer is None else outer.gpu_base
            try:
                return fn(view, src, Path(out), **kwargs)
            finally:
                _current.reset(token)
        run.stage = spec
        return run
    return wrap


@functools.lru_cache(maxsize=None)
def code_digest(module: str) -> str:
    """A digest of the source files of the package that holds `module` ("" when it has no file).

    The whole package, not the one module: a stage's behaviour lives in its helpers too (qad in
    tune.py, kquants.py, blocks.py). Shared top-level modules are left out, so a change there does
    not redo every stage of every run; pass force=true after such a change."""
    file = getattr(sys.modules.get(module), "__file__", None)
    if not file:
        return ""
    root = Path(file).parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- the config a stage sees

class ConfigView:
    """Attribute access to the declared keys of a RunConfig; anything else raises UndeclaredKey."""

    def __init__(self, cfg, keys, stage_name: str, prefix: str = ""):
        self._cfg, self._keys, self._stage, self._prefix = cfg, tuple(keys), stage_name, prefix

    def _allowed(self, key: str) -> str:
        """'whole' when key (or a section above it) is declared, 'part' when keys below it are."""
        if any(key == k or key.startswith(k + ".") for k in self._keys):
            return "whole"
        if any(k.startswith(key + ".") for k in self._keys):
            return "part"
        return ""

    def _get(self, key: str):
        node = self._cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def _check(self, key: str) -> str:
        allowed = self._allowed(key)
        if not allowed:
            raise UndeclaredKey(f"stage '{self._stage}' read config key '{key}' which it does not declare; "
                                f"add it to the stage's reads so that changing it redoes the stage")
        return allowed

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        if not self._prefix and name in LOCATIONS:
            return getattr(self._cfg, name)
        key = self._prefix + name
        allowed = self._check(key)
        value = self._get(key)
        if allowed == "part" and dataclasses.is_dataclass(value):
            return ConfigView(self._cfg, self._keys, self._stage, key + ".")
        return value

    def __setattr__(self, name, value):
        if name.startswith("_"):
            return object.__setattr__(self, name, value)
        raise AttributeError(f"stage '{self._stage}' may not change the run config ({name})")

    def section(self, name: str) -> dict:
        """A section as a dict: all of it when declared whole, else the declared keys of it."""
        value = getattr(self, name)
        if dataclasses.is_dataclass(value):
            return dataclasses.asdict(value)
        return {k.split(".", 1)[1]: _plain(self._get(k)) for k in self._keys if k.startswith(name + ".")}


def _root(cfg):
    return cfg._cfg if isinstance(cfg, ConfigView) else cfg


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _flatten(items) -> list:
    out = []
    for x in items:
        if isinstance(x, (list, tuple)):
            out += _flatten(x)
        elif x is not None:
            out.append(x)
    return out


# ---------------------------------------------------------------- what a stage cost

# The peak RSS is reset where the OS allows it (Linux); elsewhere it is the process's peak so far.
# A stage that resets CUDA's peak itself (distill, for its own figure) shows its training peak.

def reset_peaks() -> int:
    """Reset the process's peak RSS and CUDA's peak; returns the CUDA bytes already allocated."""
    try:   # Linux: writing 5 to clear_refs resets VmHWM, the process's peak RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    torch = _torch_if_loaded()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return 0


def cost(ident: Identity) -> dict:
    """{"wall_s", "device", "peak_rss_mb", "peak_gpu_mb"} of the stage `ident` names, so far."""
    device, gpu = "cpu", None
    torch = _torch_if_loaded()
    # on CUDA only when the stage allocated there: tensors left by earlier stages do not count
    if torch is not None and torch.cuda.is_available() and torch.cuda.max_memory_allocated() > ident.gpu_base:
        device = torch.cuda.get_device_name()
        gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return {"wall_s": round(time.time() - ident.started, 3), "device": device,
            "peak_rss_mb": round(peak_rss_mb(), 1), "peak_gpu_mb": gpu}


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB.

    Linux: VmHWM of the current address space. getrusage's ru_maxrss is not used there because
    exec keeps the high-water mark of the address space it replaces, and subprocess spawns with
    vfork, so a child would report the *parent's* peak. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0    # kB
    except OSError:
        pass
    import sys
    try:
        import resource
    except ImportError:   # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def _torch_if_loaded():
    """torch only when a stage already imported it: measuring must not pay torch's import."""
    import sys
    return sys.modules.get("torch")
