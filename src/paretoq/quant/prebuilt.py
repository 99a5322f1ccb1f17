"""Kernels built ahead of time (AOTInductor) in a child process and loaded without torch's compiler.

``torch.compile`` in the training process costs memory that stays: compiling the quantizer's two
kernels imports Inductor (~560 modules, ~40 MiB) and leaves its code and caches resident, and the
compile's own transient lands in the first step, when the activations are live (measured on an
Intel Xeon: peak RSS +102 MiB over FP training at 1×256 tokens, ``benchmarks/memory.py``). A
``Prebuilt`` function instead runs a kernel that a child process exported (``torch.export``) and
compiled (``torch._inductor.aoti_compile_and_package``) once and left on disk; the training
process loads it with ``torch._C._aoti.AOTIModelPackageLoader`` (C++, ~1 MiB, no Python module
imported) and calls it in ~7 µs (a ``Kernel`` call: ~25 µs).

- Same math: the child traces the same function (``fn``, e.g. ``compiled._forward``) through the
  same Inductor code generator; the tests compare every scheme with the eager quantizer.
- Dynamic shapes: one kernel per function, constants (a scheme, a dtype), input dtypes and
  ``variant`` (a size regime Inductor compiles in, see ``compiled.py``), for every size ≥ 2.
- AOTInductor checks each call's inputs (dtype, sizes in the compiled ranges, strides, device)
  when ``AOTI_RUNTIME_CHECK_INPUTS`` is set, which this module sets; a call the kernel refuses
  runs ``fn`` eagerly (same numbers).
- The disk cache (``$PARETOQ_KERNEL_CACHE``, else ``~/.cache/paretoq/kernels``) is keyed on the
  torch version, this CPU (model and instruction-set flags: kernels are built with
  ``-march=native``), the source of the math and of this module, and the kernel's own spec. A
  kernel is written to a temporary name and renamed into place: a killed build leaves nothing
  half-written; a file that does not load is rebuilt once.
- Only CPU tensors: others go to ``other`` (the ``torch.compile`` path, ``kernel.Kernel``).
  Constants must be registered schemes (``functional.SCHEMES``) or dtypes; a call with another
  scheme goes to ``other`` too.

    python -m paretoq.quant.prebuilt JOBS.json   # the child: builds the kernels JOBS.json lists
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from paretoq.quant import functional

logger = logging.getLogger(__name__)

_MIN_SIZE = 2  # torch.export specialises sizes 0 and 1; smaller inputs are refused by the check and run eager


class BuildError(RuntimeError):
    """A kernel could not be built or loaded (no C++ compiler, a PyTorch without AOTInductor, ...)."""


def cache_dir() -> Path:
    root = os.environ.get("PARETOQ_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paretoq" / "kernels"


def _machine() -> str:
    """What a kernel built here depends on besides its source: torch, and the CPU (``-march=native``)."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    cpu += line
                if "flags" in cpu:
                    break
    except OSError:
        import platform

        cpu = platform.machine() + platform.processor()
    return f"{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{cpu}"


def _sources() -> str:
    """The code a kernel is traced from: the quantizer's math, the kernels' bodies and this builder."""
    from paretoq.quant import compiled

    return "".join(Path(m.__file__).read_text() for m in (functional, compiled, sys.modules[__name__]))


def _encode(value):
    if isinstance(value, functional.Scheme):
        if functional.SCHEMES.get(value.bits) is not value:
            raise KeyError(value)
        return {"scheme": value.bits}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise KeyError(value)


def _decode(value):
    if "scheme" in value:
        return functional.SCHEMES[value["scheme"]]
    return getattr(torch, value["dtype"])


class Prebuilt:
    """``fn`` (tensors and constants in, fresh tensors out) as a kernel built ahead; call it as ``fn``.

    ``shapes``: per argument of ``fn``, a tensor's sizes (symbols such as ``"rows"`` shared between
    arguments, or fixed ints), or ``None`` for a constant. ``variant(*args)`` (optional) names the
    size regime of a call; ``examples[variant]`` gives the symbols' sizes the kernel for it is
    traced at. Non-CPU tensors and unregistered constants go to ``other(*args)``.
    """

    def __init__(self, fn: Callable, shapes: tuple, *, other: Callable, examples: dict,
                 variant: Callable | None = None):
        self.fn, self.shapes, self.other = fn, shapes, other
        self.examples, self.variant = examples, variant
        self._tensor_args = tuple(i for i, s in enumerate(shapes) if s is not None)
        self._runners: dict[tuple, object] = {}

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # inside a caller's torch.compile: the plain math, traced into its graph
            return self.fn(*args)
        first = args[self._tensor_args[0]]
        if first.device.type != "cpu":
            return self.other(*args)
        if torch._C._len_torch_dispatch_stack() or min(first.shape) < _MIN_SIZE or not first.is_contiguous():
            return self.fn(*args)  # (a dispatch mode such as a FLOP counter sees the eager ops)
        key = self.key(args)
        runner = self._runners.get(key)
        if runner is None:
            try:
                runner = self._load(key)
            except KeyError:  # a constant the child cannot rebuild (an unregistered scheme)
                return self.other(*args)
        try:
            out = runner.run([args[i] for i in self._tensor_args])
        except RuntimeError:  # AOTInductor's input check: outside the compiled sizes, strides or dtypes
            return self.fn(*args)
        return out[0] if len(out) == 1 else tuple(out)

    def key(self, args) -> tuple:
        """(constants and input dtypes, variant): what one kernel serves."""
        key = tuple(a if s is None else a.dtype for a, s in zip(args, self.shapes))
        return key + ((self.variant(*args),) if self.variant is not None else ())

    def job(self, key: tuple) -> dict:
        """What the child needs to build the kernel for ``key``, and the file it goes to."""
        variant = key[-1] if self.variant is not None else None
        args = []
        for value, shape in zip(key, self.shapes):
            if shape is None:
                args.append({"const": _encode(value)})
            else:
                args.append({"tensor": str(value).removeprefix("torch."), "shape": list(shape)})
        spec = {"fn": f"{self.fn.__module__}:{self.fn.__qualname__}", "args": args,
                "sizes": self.examples[variant]}
        digest = hashlib.sha256((_machine() + _sources() + json.dumps(spec, sort_keys=True)).encode()).hexdigest()
        name = f"{self.fn.__name__.strip('_')}-{digest[:24]}.pt2"
        return {**spec, "path": str(cache_dir() / name)}

    def loaded(self) -> list[tuple]:
        return list(self._runners)

    def forget(self) -> None:
        self._runners = {}

    def _load(self, key: tuple, job: dict | None = None):
        job = job or self.job(key)
        path = Path(job["path"])
        if not path.exists():
            build([job])
        try:
            runner = _open(path)
        except RuntimeError:  # a damaged file: build it again, once
            path.unlink(missing_ok=True)
            build([job])
            runner = _open(path)
        self._runners[key] = runner
        return runner


def _open(path: Path):
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # read by each kernel at its first call
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader
    except AttributeError as e:
        raise BuildError("this PyTorch has no AOTInductor runtime") from e
    return loader(str(path), "model", False, 1, -1)


def prepare(calls: list[tuple[Prebuilt, tuple]]) -> int:
    """Build (children in parallel, one per CPU core at most) and load the kernels of ``calls``
    (``(function, key)`` pairs) not loaded yet; returns how many were built."""
    todo = [(fn, key, fn.job(key)) for fn, key in calls if key not in fn._runners]
    missing = {job["path"]: job for _, _, job in todo if not Path(job["path"]).exists()}
    if missing:
        build(list(missing.values()))
    for fn, key, job in todo:
        fn._load(key, job)
    return len(missing)


def build(jobs: list[dict]) -> None:
    """Build ``jobs`` in child processes (their memory is gone when they exit), split over the cores."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    logger.info("building %d quantizer kernel(s) ahead of time into %s (once per machine and version)",
                len(jobs), cache_dir())
    src = str(Path(functional.__file__).resolve().parents[2])  # the folder holding the paretoq package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    children = [subprocess.Popen([sys.executable, "-m", "paretoq.quant.prebuilt", json.dumps(jobs[i::workers])],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
                for i in range(workers)]
    errors = []
    for child in children:
        _, err = child.communicate()
        if child.returncode != 0:
            lines = [line for line in err.strip().splitlines() if line.strip()]
            errors.append(lines[-1] if lines else f"kernel build exited with status {child.returncode}")
    if errors:
        raise BuildError(errors[0])
    logger.info("built in %.0f s", time.perf_counter() - started)


def _build_one(job: dict) -> None:
    from torch.export import Dim, export

    module_name, qualname = job["fn"].split(":")
    fn = getattr(importlib.import_module(module_name), qualname)
    dims = {name: Dim(name, min=_MIN_SIZE) for name in job["sizes"]}
    consts, examples, dynamic = {}, [], []
    gen = torch.Generator().manual_seed(0)
    for i, arg in enumerate(job["args"]):
        if "const" in arg:
            consts[i] = _decode(arg["const"])
            continue
        shape = [job["sizes"][d] if isinstance(d, str) else d for d in arg["shape"]]
        examples.append((torch.rand(shape, generator=gen) + 0.5).to(getattr(torch, arg["tensor"])))
        dynamic.append({k: dims[d] for k, d in enumerate(arg["shape"]) if isinstance(d, str)} or None)

    class Call(torch.nn.Module):
        def forward(self, *tensors):
            it = iter(tensors)
            return fn(*(consts[i] if i in consts else next(it) for i in range(len(job["args"]))))

    program = export(Call(), tuple(examples), dynamic_shapes=(tuple(dynamic),))
    path = Path(job["path"])
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # aoti_compile_and_package wants a .pt2 name
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    jobs = json.loads(Path(argv[0]).read_text() if argv[0].endswith(".json") else argv[0])
    for job in jobs:
        _build_one(job)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
