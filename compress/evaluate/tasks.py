"""Benchmark tasks (lm-eval) on an artifact, in the runtime it ships in, with the teacher's tokenizer.

    compress run profile=phone eval.tasks=[arc_easy,copa] eval.limit=100 eval.task_data=DIR
    check(cfg)                                    # names and paths, before anything runs
    results = run(cfg, opener, tokenizer, max_length)   # {"arc_easy": {"metric": "acc", ...}}

Where tasks come from, per name:
  1. `eval.task_data=DIR`: YAMLs shipped in compress/evaluate/task_yamls/ reproduce lm-eval's
     standard arc_easy, boolq, copa, openbookqa and lambada_openai over local files
     (DIR/<task>/<file>.jsonl in llm-foundry's local_data format); compress ships YAMLs, never data.
  2. `eval.include_path=DIR`: your own lm-eval task YAMLs (they override same-named built-ins).
  3. lm-eval's own task registry (the datasets come from the Hugging Face hub).
A bad name is a UserError before anything runs. A task whose dataset cannot be reached (offline,
say) is recorded as {"unavailable": reason} with one warning, so it never kills a long run. When
the hub does not answer a connect, lookups run in the hub's offline mode (datasets already in the
local cache still load) instead of retrying for ~25 s per task.

Tasks are loaded once per process (datasets included) and reused for every artifact; lm-eval's
full registry takes ~8 s to index, so it is only built when a name is not found in 1 or 2.
"""
from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import random
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError, closest

SHIPPED = Path(__file__).with_name("task_yamls")
# Primary metric per task: the first of these it reports (lm-eval's headline metric).
PRIMARY = ("acc", "exact_match,strict-match", "exact_match", "acc_norm", "mc2", "f1")
BOOTSTRAP_ITERS = 1000   # stderr of non-mean metrics (perplexity); acc stderr is analytic
SEED = 1234              # lm-eval's default seeds: few-shot sampling is reproducible

_managers: dict = {}   # (include dirs, with lm-eval's own tasks) -> TaskManager
_rendered: dict = {}   # eval.task_data -> temp folder of shipped YAMLs filled in for it
_loaded: dict = {}     # (tasks, task_data, include_path) -> ([Task], {name: unavailable reason})


# ---------------------------------------------------------------- where tasks come from

def include_dirs(cfg) -> list[str]:
    """Task folders for lm-eval: the shipped YAMLs rendered over eval.task_data, then eval.include_path."""
    e = cfg.eval
    dirs = []
    if e.task_data:
        dirs.append(str(rendered_shipped(e.task_data)))
    if e.include_path:
        p = Path(e.include_path).expanduser()
        if not p.is_dir():
            raise UserError(f"eval.include_path={e.include_path} is not a directory; give the folder that "
                            f"holds your lm-eval task YAMLs")
        if not any(p.rglob("*.yaml")) and not any(p.rglob("*.yml")):
            raise UserError(f"eval.include_path={e.include_path} holds no .yaml task files; give the folder "
                            f"that holds your lm-eval task YAMLs")
        dirs.append(str(p.resolve()))
    return dirs


def rendered_shipped(task_data: str) -> Path:
    """The shipped YAMLs whose data file exists under task_data, with its path filled in (temp dir)."""
    root = Path(task_data).expanduser()
    if not root.is_dir():
        raise UserError(f"eval.task_data={task_data} is not a directory; give the folder holding "
                        f"arc_easy/, boolq/, copa/, openbookqa/, lambada_openai/ (llm-foundry local_data files)")
    root = root.resolve()
    if str(root) in _rendered:
        return _rendered[str(root)]
    out = Path(tempfile.mkdtemp(prefix="compress-tasks-"))
    atexit.register(shutil.rmtree, out, True)
    found = 0
    for src in sorted(SHIPPED.glob("*.yaml")):
        text = src.read_text()
        rel = next(line.split('"')[1] for line in text.splitlines() if "@TASK_DATA@" in line)
        if (root / rel.replace("@TASK_DATA@/", "")).is_file():
            (out / src.name).write_text(text.replace("@TASK_DATA@", str(root)))
            found += 1
    if not found:
        raise UserError(f"eval.task_data={task_data} holds none of the files the shipped tasks read "
                        f"(e.g. arc_easy/arc_easy.jsonl); see README 'Benchmark tasks'")
    _rendered[str(root)] = out
    return out


def manager(include: list[str], defaults: bool):
    """A cached lm-eval TaskManager over `include` (+ lm-eval's own tasks when defaults)."""
    key = (tuple(include), defaults)
    if key not in _managers:
        from lm_eval.tasks import TaskManager
        logging.getLogger("lm_eval").setLevel(logging.ERROR)   # its override/info chatter
        _managers[key] = TaskManager(include_path=include or None, include_defaults=defaults)
    return _managers[key]


def resolve(cfg):
    """The TaskManager that knows every name in eval.tasks; UserError naming the closest for a typo."""
    names = [str(t) for t in cfg.eval.tasks]
    include = include_dirs(cfg)
    if include:
        tm = manager(include, defaults=False)
        if all(n in tm.all_tasks for n in names):
            return tm
    tm = manager(include, defaults=True)
    for n in names:
        if n not in tm.all_tasks:
            raise UserError(f"unknown lm-eval task '{n}'{closest(n, tm.all_tasks)}; use a name from "
                            f"`lm-eval ls tasks`, or eval.include_path=DIR holding its YAML")
    return tm


def check(cfg) -> None:
    """Fail before any stage runs when a task name or a task path is wrong."""
    if cfg.eval.tasks:
        resolve(cfg)


def load(cfg) -> tuple[list, dict]:
    """([lm-eval Task], {name: "unavailable: reason"}), loaded once per process and reused."""
    e = cfg.eval
    key = (tuple(map(str, e.tasks)), e.task_data, e.include_path)
    if key in _loaded:
        return _loaded[key]
    tm = resolve(cfg)
    include = include_dirs(cfg)
    local = set(manager(include, defaults=False).all_tasks) if include else set()   # need no hub
    tasks, unavailable = [], {}
    for name in map(str, e.tasks):
        try:
            with quiet(), hub_offline(name not in local and not hub_reachable()):
                tasks += list(tm.load([name])["tasks"].values())
        except Exception as err:   # offline hub, missing file, broken YAML: keep the run going
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            unavailable[name] = f"unavailable: {type(err).__name__}: {reason}"
            warnings.warn(f"task {name} skipped, its data could not be loaded ({reason}); offline, give "
                          f"eval.task_data=DIR or eval.include_path=DIR with local files", stacklevel=2)
    _loaded[key] = (tasks, unavailable)
    return tasks, unavailable


def hub_address() -> tuple[str, int]:
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


_reachable: dict = {}


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub accepts a TCP connection (asked once per process). Behind an
    HTTP(S) proxy a direct connect says nothing, so the hub is assumed reachable there."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")):
        return True
    addr = hub_address()
    if addr not in _reachable:
        try:
            socket.create_connection(addr, timeout=timeout).close()
            _reachable[addr] = True
        except OSError:
            _reachable[addr] = False
    return _reachable[addr]


@contextlib.contextmanager
def hub_offline(offline: bool):
    """Put huggingface_hub and datasets in offline mode for the block: a missing dataset fails at
    once with OfflineModeIsEnabled and a cached one loads; without this, every lookup is retried
    with backoff for ~25 s before failing."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants
    saved = constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------- running and recording

@contextlib.contextmanager
def quiet():
    """lm-eval and datasets draw progress bars and log per task; the pipeline prints its own lines."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run(cfg, opener, tokenizer, max_length: int) -> dict:
    """Score eval.tasks on the runtime `opener(n_ctx)` opens; {task: result or unavailable}."""
    if not cfg.eval.tasks:
        return {}
    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate
    from .lm_adapter import RuntimeLM
    tasks, unavailable = load(cfg)
    out = {name: {"unavailable": why} for name, why in unavailable.items()}
    if not tasks:
        return out
    for t in tasks:   # as simple_evaluate: few-shot count and seeds, so every artifact sees the same prompts
        if cfg.eval.num_fewshot is not None and t.get_config("num_fewshot") != 0:
            t.set_config(key="num_fewshot", value=cfg.eval.num_fewshot)
        elif t.get_config("num_fewshot") is None:
            t.set_config(key="num_fewshot", value=0)
        t.set_fewshot_seed(seed=SEED)
    random.seed(0)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    lm = RuntimeLM(opener, tokenizer, max_length=max_length)
    try:
        with quiet():
            res = evaluate(lm=lm, task_dict={"tasks": {t.task_name: t for t in tasks}, "groups": {}, "group_map": {}},
                           limit=cfg.eval.limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
                           verbosity="ERROR")
    finally:
        lm.close()
    for t in tasks:
        out[t.task_name] = summarize(t.task_name, res, t.get_config("output_type"),
                                     t.get_config("num_fewshot"))
    return out


def summarize(name: str, res: dict, output_type: str, num_fewshot) -> dict:
    """One task's lm-eval results -> {metric, value, stderr, n, chance, metrics{...}, ...}."""
    raw = res["results"][name]
    higher = res.get("higher_is_better", {}).get(name, {})
    metrics = {}
    for key, value in raw.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        label = metric if filt == "none" else key
        err = raw.get(f"{metric}_stderr,{filt}")
        metrics[label] = {"value": float(value),
                          "stderr": float(err) if isinstance(err, (int, float)) else None,
                          "higher_is_better": higher.get(metric)}
    primary = next((m for m in PRIMARY if m in metrics), None) or next(
        (m for m, v in metrics.items() if v["higher_is_better"]), next(iter(metrics), None))
    samples = res.get("samples", {}).get(name) or []
    return {
        "metric": primary,
        "value": metrics[primary]["value"] if primary else None,
        "stderr": metrics[primary]["stderr"] if primary else None,
        "n": len(samples) or (res.get("n-samples", {}).get(name) or {}).get("effective"),
        "chance": chance(output_type, samples),
        "output_type": output_type,
        "num_fewshot": num_fewshot,
        "metrics": metrics,
    }


def chance(output_type: str, samples: list) -> float | None:
    """Expected accuracy of a uniform guess: mean 1/#choices for multiple choice, 0 otherwise."""
    if output_type == "multiple_choice":
        sizes = [len(s.get("arguments") or ()) for s in samples]
        sizes = [k for k in sizes if k]
        return sum(1.0 / k for k in sizes) / len(sizes) if sizes else None
    if output_type in ("loglikelihood", "generate_until"):
        return 0.0   # greedy match / exact match: a guess is essentially never right
    return None
