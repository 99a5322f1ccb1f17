"""lm-evaluation-harness tasks on an already-loaded model (plain, fake-quant or packed).

The model object is wrapped in lm-eval's ``HFLM`` as it is, so a packed model is evaluated as
packed (its ``PackedLinear`` layers run), not reloaded or dequantized into something else.

Offline by construction: while tasks are built and run, ``HF_DATASETS_OFFLINE=1`` and
``HF_HUB_OFFLINE=1`` are set (and the already-imported ``datasets`` / ``huggingface_hub``
switches flipped), so a hub task works only when its dataset is in the local datasets cache and
fails with one line otherwise. Local tasks — lm-eval YAML tasks over local files, in folders
given as ``include_path`` — need nothing else; paretoq ships one, ``kjv_cloze`` (which of four
words ends a King James verse; metrics acc and acc_norm), under ``paretoq/data/tasks``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from pathlib import Path

from paretoq.errors import UserError

logger = logging.getLogger(__name__)

LOCAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "data" / "tasks"
OFFLINE_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
LIST_HINT = "paretoq eval --list_tasks shows the tasks available offline"


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError("--tasks needs lm-eval, which is not installed: pip install 'paretoq[eval]'") from None


@contextlib.contextmanager
def offline():
    """Set the hub/datasets offline switches for the duration of the block, then restore them."""
    import sys

    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    flips = []  # (module, attribute, old value)
    for module_name, attr in (("datasets.config", "HF_DATASETS_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                              ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, attr):
            flips.append((module, attr, getattr(module, attr)))
            setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, old in reversed(flips):
            setattr(module, attr, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _include_paths(include_path=None) -> list[str]:
    extra = [] if include_path is None else [include_path] if isinstance(include_path, (str, os.PathLike)) \
        else list(include_path)
    paths = [str(LOCAL_TASKS_DIR)]
    for p in extra:
        if not Path(p).is_dir():
            raise UserError(f"--include_path {p}: no such folder (give a folder of lm-eval task YAML files)")
        paths.append(str(p))
    return paths


def task_manager(tasks: list[str] | None = None, include_path=None):
    """An lm-eval ``TaskManager`` over the local task folders; lm-eval's own task index (slow to
    build: ~15k YAML files) is added only when a requested name is not a local task."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    local = TaskManager(include_path=paths, include_defaults=False)
    if tasks is not None and all(t in local.all_tasks for t in tasks):
        return local
    return TaskManager(include_path=paths, include_defaults=True)


def available_tasks(include_path=None, local_only: bool = False) -> list[str]:
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    return list(TaskManager(include_path=_include_paths(include_path), include_defaults=not local_only).all_tasks)


def local_task_names(include_path=None) -> list[str]:
    return available_tasks(include_path, local_only=True)


def parse_task_list(value: str | list[str]) -> list[str]:
    names = value.split(",") if isinstance(value, str) else [n for v in value for n in v.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise UserError("--tasks is empty: give task names separated by commas, e.g. --tasks kjv_cloze")
    return list(dict.fromkeys(names))


def check_tasks(tasks: list[str], include_path=None):
    """The TaskManager to run ``tasks`` with; one line naming the first unknown task otherwise."""
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        local = ", ".join(local_task_names(include_path))
        raise UserError(f"unknown lm-eval task {unknown[0]!r} (local tasks: {local}; {LIST_HINT}; "
                        "add your own task folder with --include_path)")
    return manager


def _metrics(task_results: dict) -> dict:
    """{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} → {"acc": 0.5, "acc_stderr": 0.1}."""
    out = {}
    for key, value in task_results.items():
        if key == "alias" or not isinstance(value, (int, float)):
            continue
        name, _, filt = key.partition(",")
        out[name if filt in ("", "none") else key] = value
    return out


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval 0.4 (``evaluator.simple_evaluate``) records the git commit of the current folder by
    running ``git describe`` with the terminal as its stderr, so outside a git checkout every
    evaluation prints "fatal: not a git repository". For the call, ``evaluator.get_git_commit_hash``
    runs the same command with its stderr captured (same value, or None); other lm-eval versions are
    left alone."""
    import lm_eval
    from lm_eval import evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None or not getattr(lm_eval, "__version__", "").startswith("0.4"):
        yield
        return

    def quiet():
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (subprocess.CalledProcessError, OSError):
            return None
        return out.stdout.strip() or None

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def run_tasks(model, tokenizer, tasks: list[str], include_path=None, batch_size: int = 8, limit: float | None = None,
              num_fewshot: int | None = None, max_length: int | None = None, seed: int = 1234,
              manager=None) -> dict:
    """Run lm-eval ``tasks`` on ``model`` (a loaded transformers model); returns
    {"tasks": {task: {metric: value}}, "n_samples": {...}, "versions": {...}, "limit": limit}."""
    _require_lm_eval()
    with offline():
        manager = manager or check_tasks(tasks, include_path)
        try:
            manager.load(list(tasks))  # builds the datasets now, so a missing one fails with one line
        except Exception as e:  # datasets / hub errors come in many types
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(f"lm-eval tasks {','.join(tasks)}: cannot load the data offline ({type(e).__name__}: "
                            f"{first}); only datasets already in the local cache and local tasks can run") from None
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        with _quiet_git_hash():
            results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                              num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
                                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
    if results is None:  # not rank 0
        return {}
    return {
        "tasks": {name: _metrics(r) for name, r in results.get("results", {}).items()},
        "n_samples": {name: dict(n) for name, n in results.get("n-samples", {}).items()},
        "versions": {name: v for name, v in results.get("versions", {}).items()},
        "limit": limit,
    }
