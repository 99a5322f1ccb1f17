"""Fused quantizer kernels: the math of ``functional.py`` in one pass over each weight.

The eager quantizer (``functional.py``) makes about a dozen elementwise passes over cache-sized
blocks of a weight. A fused kernel makes one: forward reads W and α and writes
Ŵ = α̃·q(W/α̃) in the compute dtype; backward reads W, α and g = ∂L/∂Ŵ and writes
∂L/∂W = M ⊙ g and the row sums ∂L/∂α = s_g·Σ coef ⊙ g. The kernels are traced from the scheme
objects' own methods (``_forward`` and ``_backward`` below call them), so the math stays in
``functional.py``: Ŵ and ∂L/∂W are bit-identical to the eager quantizer, ∂L/∂α sums the same
fp32 products in another order (``tests/quant/test_fused.py``).

Dtypes: weights and scales are fp32 (the master weights); Ŵ comes out in the dtype asked for
(bf16 under autocast, rounded once from the fp32 product); g may be fp32, bf16 or fp16 and is
read as fp32; both gradients are fp32. Every layout goes in as 2-D rows, one row per scale: a
group of g columns is viewed as a row of its own, so one kernel serves per-row and grouped
scales of every layer shape.

Where the kernels come from:

- CPU tensors: kernels built ahead of time. A child process (``python -m paretoq.quant.fused
  JOBS.json``) traces a function with ``torch.export`` (dynamic sizes ≥ 2) and compiles it with
  AOTInductor (``torch._inductor.aoti_compile_and_package``) into a ``.pt2`` file; the training
  process loads it with ``torch._inductor.aoti_load_package`` and calls it. No Inductor compile
  (and none of its compiler modules or transient memory) in the training process. One kernel per
  function, scheme, dtype and, for the backward, size regime: Inductor sums rows longer than
  4096 values in chunks and compiles that choice in, so short rows (≤ 4096) and long rows get
  kernels of their own, each exported for exactly its range of sizes.
- Disk cache: ``$PARETOQ_KERNEL_CACHE``, else ``~/.cache/paretoq/kernels`` (under
  ``$XDG_CACHE_HOME`` when set). A file's name hashes the torch version, this CPU (model and
  instruction-set flags: kernels are built for the building machine), the source of
  ``functional.py`` and of this module, and the kernel's spec. A kernel is written under a
  temporary name and renamed into place (a killed build leaves nothing half-written); a file that
  does not load is built again, once.
- CUDA tensors: hand-written Triton kernels (``paretoq.quant.triton_kernels``), which compute
  every fp32 operation of ``functional.py`` as it does (correctly rounded division, round half to
  even, no FMA contraction): Ŵ and ∂L/∂W the eager quantizer's bits there too. ``torch.compile``'s
  Triton code divides with an approximate fp32 division, off by an ulp for a few values
  (triton-lang/triton#10661), so it is no longer used on GPUs. ``FusedKernels(triton=True)`` runs
  them for every tensor (CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``: the tests),
  ``triton=False`` never. Without Triton installed (``pip install paretoq[triton]``), one warning
  and the eager math.
- Other devices (and CPU tensors with ``FusedKernels(ahead_of_time=False)``, or with a scheme that
  is not in ``functional.SCHEMES``, which a child could not rebuild): ``torch.compile(fn,
  dynamic=True, fullgraph=True)`` in the process, with a recompile limit wide enough for every
  scheme and dtype, and an error instead of a silent eager fallback when it is reached.
- A call a kernel does not take (a size below 2, a non-contiguous weight or scale, weights or
  scales not fp32) runs the eager math of ``functional.py``: the same numbers. AOTInductor's own
  check of each call's inputs is switched on as well (``AOTI_RUNTIME_CHECK_INPUTS``): an input
  that slipped past those checks is refused (a failure, below), never read with the wrong layout.
  Inside a caller's own ``torch.compile`` the plain formulas are traced into the caller's graph.
- Failure (no C++ compiler, a PyTorch without AOTInductor, a compile error): one warning, and
  that ``FusedKernels`` object runs the eager math from then on (same numbers).

``FusedKernels.calls`` counts the calls by the path they took ("prebuilt", "compiled", "eager",
"triton"),
so callers and tests can see that a kernel actually ran. Use: ``set_kernels(model, "fused")``
(or ``quantize_model(..., kernels="fused")``) gives every ``QuantLinear`` of a model one shared
``FusedKernels``; ``prebuild(schemes, dtype)`` builds and loads what a training run will call
before its model takes memory (``paretoq train`` does).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from paretoq.files import atomic_file
from paretoq.quant import functional

logger = logging.getLogger(__name__)

MIN_SIZE = 2  # torch.export specialises sizes 0 and 1: smaller inputs run the eager math
LONG_ROW = 4096  # the backward's row sum is compiled differently above this many columns
KERNEL_CHOICES = ("eager", "fused", "auto")
AUTO_DEVICES = ("cpu", "cuda")  # where "auto" picks the fused kernels: each has kernels bit-exact with the eager math


# -- the traced functions (the math itself is functional.py's) ----------------------------------
def _forward(w: torch.Tensor, a: torch.Tensor, scheme, dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = α̃·q(W/α̃) in ``dtype``; W (rows, cols), α (rows, 1), fp32."""
    a = functional.effective_scale(a)
    return (scheme.quantize_scaled(w, a) * a).to(dtype)


def _backward(w: torch.Tensor, a: torch.Tensor, scheme, grad: torch.Tensor, s_g: torch.Tensor):
    """(M ⊙ g, s_g·Σ_row coef ⊙ g) in fp32; ``grad`` in any float dtype, ``s_g`` a 0-d fp32 tensor (a
    Python float would be compiled in as a constant: one kernel per weight size)."""
    a = functional.effective_scale(a)
    g = grad.to(torch.float32)
    x = w / a
    c = x.clamp(scheme.lo, scheme.hi)
    mask = (c == x).to(torch.float32)
    coef = scheme.coefficient_(scheme.quantize_(c, w), x, mask)
    return g * mask, (coef * g * s_g).sum(dim=-1, keepdim=True)


def _rows(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W and α as (rows, columns) and (rows, 1), one row per scale: a group of columns is a row of
    its own (a view; per-row scales need none)."""
    groups = scale.shape[-1]
    if groups == 1:
        return weight, scale
    return weight.reshape(-1, weight.shape[1] // groups), scale.reshape(-1, 1)


# -- kernels built ahead of time (CPU) -----------------------------------------------------------
class BuildError(RuntimeError):
    """A kernel could not be built or loaded (no C++ compiler, a PyTorch without AOTInductor, ...)."""


def cache_dir() -> Path:
    root = os.environ.get("PARETOQ_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "paretoq" / "kernels"


@functools.cache
def _machine() -> str:
    """What a kernel built here depends on besides its source: torch, and the CPU it is built for."""
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


@functools.cache
def _sources() -> str:
    """The code a kernel is traced from: the quantizer's math and this module."""
    return "".join(Path(m.__file__).read_text() for m in (functional, sys.modules[__name__]))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# A kernel's key: (function name, scheme, dtype, long rows). ``dtype`` is Ŵ's for the forward and
# g's for the backward; ``long`` is None for the forward (elementwise: one kernel for every size),
# False / True for the backward's short rows (≤ LONG_ROW columns) and long rows.
_F32 = torch.float32
_REGIMES = {None: {"dims": {"rows": [MIN_SIZE, None], "cols": [MIN_SIZE, None]}, "sizes": {"rows": 64, "cols": 48}},
            False: {"dims": {"rows": [MIN_SIZE, None], "cols": [MIN_SIZE, LONG_ROW]}, "sizes": {"rows": 64, "cols": 48}},
            True: {"dims": {"rows": [MIN_SIZE, None], "cols": [LONG_ROW + 1, None]},
                   "sizes": {"rows": 8, "cols": LONG_ROW + 8}}}


def _arguments(name: str, scheme, dtype: torch.dtype) -> list[dict]:
    """The traced function's arguments: a tensor's dtype and sizes (symbols or ints), or a constant."""
    w = {"tensor": "float32", "shape": ["rows", "cols"]}
    a = {"tensor": "float32", "shape": ["rows", 1]}
    s = {"const": {"scheme": scheme.bits}}
    if name == "forward":
        return [w, a, s, {"const": {"dtype": _dtype_name(dtype)}}]
    return [w, a, s, {"tensor": _dtype_name(dtype), "shape": ["rows", "cols"]}, {"tensor": "float32", "shape": []}]


def _registered(scheme) -> bool:
    """Whether a child can rebuild ``scheme``: one of ``functional.SCHEMES``, or an equal copy (the
    scheme of a copied or unpickled model)."""
    known = functional.TABLE_SCHEMES.get(scheme.bits)
    return known is scheme or known == scheme


def job(key: tuple) -> dict:
    """What a child needs to build the kernel ``key``, and the file it goes to."""
    name, scheme, dtype, long = key
    if not _registered(scheme):
        raise KeyError(f"{scheme!r} is not a registered scheme (functional.SCHEMES)")
    spec = {"fn": f"{__name__}:_{name}", "args": _arguments(name, scheme, dtype), **_REGIMES[long]}
    digest = hashlib.sha256((_machine() + _sources() + json.dumps(spec, sort_keys=True)).encode()).hexdigest()
    return {**spec, "path": str(cache_dir() / f"{name}-{digest[:24]}.pt2")}


_PACKAGES: dict[str, object] = {}
"""Loaded kernel files by path: a cache of what is on disk, shared by every ``FusedKernels``."""


def _open(path: Path):
    # AOTInductor's own check of each call's inputs (dtypes, sizes in the compiled ranges, strides),
    # read by a kernel at its first call: a call that slipped past ours is refused, not misread
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    try:
        from torch._inductor import aoti_load_package
    except ImportError as e:
        raise BuildError("this PyTorch has no AOTInductor runtime") from e
    return aoti_load_package(str(path))


def load(job_: dict):
    """The loaded kernel of ``job_``: from memory, from disk, or built (a damaged file once again)."""
    path = Path(job_["path"])
    package = _PACKAGES.get(job_["path"])
    if package is not None:
        return package
    if not path.exists():
        build([job_])
    try:
        package = _open(path)
    except RuntimeError:  # a damaged file: build it again, once
        path.unlink(missing_ok=True)
        build([job_])
        package = _open(path)
    _PACKAGES[job_["path"]] = package
    return package


def build(jobs: list[dict]) -> None:
    """Build ``jobs`` in child processes split over the cores (their memory is gone when they exit)."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    logger.info("building %d quantizer kernel(s) ahead of time into %s (once per machine and version)",
                len(jobs), cache_dir())
    src = str(Path(functional.__file__).resolve().parents[2])  # the folder holding the paretoq package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    errors = []
    with tempfile.TemporaryDirectory(prefix="paretoq-kernels-") as tmp:
        children = []
        for i in range(workers):
            listing = Path(tmp) / f"jobs-{i}.json"
            listing.write_text(json.dumps(jobs[i::workers]))
            children.append(subprocess.Popen([sys.executable, "-m", __name__, str(listing)], stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE, text=True, env=env))
        for child in children:
            _, err = child.communicate()
            if child.returncode != 0:
                lines = [line for line in err.strip().splitlines() if line.strip()]
                errors.append(lines[-1] if lines else f"kernel build exited with status {child.returncode}")
    if errors:
        raise BuildError(errors[0])
    logger.info("built in %.0f s", time.perf_counter() - started)


def _build_one(job_: dict) -> None:
    """In the child: export the function of ``job_`` with dynamic sizes and compile it to its file."""
    import torch._inductor
    from torch.export import Dim, export

    module_name, qualname = job_["fn"].split(":")
    fn = getattr(importlib.import_module(module_name), qualname)
    dims = {name: Dim(name, min=lo, max=hi) if hi else Dim(name, min=lo) for name, (lo, hi) in job_["dims"].items()}
    consts, examples, dynamic = {}, [], []
    gen = torch.Generator().manual_seed(0)
    for i, arg in enumerate(job_["args"]):
        if "const" in arg:
            c = arg["const"]
            consts[i] = functional.TABLE_SCHEMES[c["scheme"]] if "scheme" in c else getattr(torch, c["dtype"])
            continue
        shape = [job_["sizes"][d] if isinstance(d, str) else d for d in arg["shape"]]
        examples.append((torch.rand(shape, generator=gen) + 0.5).to(getattr(torch, arg["tensor"])))
        dynamic.append({k: dims[d] for k, d in enumerate(arg["shape"]) if isinstance(d, str)} or None)

    class Call(nn.Module):
        def forward(self, *tensors):
            it = iter(tensors)
            return fn(*(consts[i] if i in consts else next(it) for i in range(len(job_["args"]))))

    program = export(Call(), tuple(examples), dynamic_shapes=(tuple(dynamic),))
    with atomic_file(job_["path"], suffix=".pt2") as tmp:  # aoti_compile_and_package wants a .pt2 name
        torch._inductor.aoti_compile_and_package(program, package_path=tmp)


# -- torch.compile (other devices) ---------------------------------------------------------------
_COMPILED: dict = {}


def _compiled(fn):
    """``fn`` through ``torch.compile`` (one wrapper per function for the process: Dynamo caches per
    function, and every scheme and dtype is a compilation of its own)."""
    compiled = _COMPILED.get(fn)
    if compiled is None:
        compiled = _COMPILED[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return compiled


def _compile_settings():
    """Room for every scheme × dtype, and an error (→ one warning, eager math) past it, not a silent fallback."""
    return torch.compiler.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True)


# -- the object a QuantLinear holds ----------------------------------------------------------------
class FusedKernels:
    """The quantizer's forward and backward as fused kernels, for ``functional.fake_quantize(...,
    kernels=...)`` and friends. CPU tensors run the kernels built ahead of time (``ahead_of_time``,
    default), CUDA tensors the Triton kernels of ``triton_kernels`` (``triton``: None = for CUDA
    tensors, True = for every tensor, CPU ones in Triton's interpreter, False = never) and other
    devices ``torch.compile``'s; a call none takes runs the eager math.

    After a failure (one warning) the object runs the eager math. ``calls`` counts calls by path:
    "prebuilt", "compiled", "eager", "triton". Callers run it with autograd off (``FakeQuantize``,
    the no-grad public functions)."""

    def __init__(self, ahead_of_time: bool = True, triton: bool | None = None):
        self.ahead_of_time = ahead_of_time
        self.triton = triton
        self.failed = False
        self.calls = {"prebuilt": 0, "compiled": 0, "eager": 0, "triton": 0}
        self._runners: dict[tuple, object] = {}  # key → loaded kernel
        self._grad_scales: dict[tuple, torch.Tensor] = {}  # (numel, grad_qp, device) → s_g as a 0-d tensor

    def __repr__(self) -> str:
        state = "failed: eager math" if self.failed else "ahead of time on CPU" if self.ahead_of_time else "torch.compile"
        return f"FusedKernels({state}, triton={self.triton}, calls={self.calls})"

    def __deepcopy__(self, memo):  # a copied model shares its kernels (they hold no model state)
        return self

    def __reduce__(self):  # a pickled model gets fresh ones
        return (FusedKernels, (self.ahead_of_time, self.triton))

    # -- calls -------------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor, scale: torch.Tensor, scheme, dtype: torch.dtype) -> torch.Tensor:
        """Ŵ in ``dtype``, as ``functional.quantize_weight``."""
        if self._uses_triton(weight, scale, scheme, dtype=dtype):
            try:
                out = _triton().forward(weight, scale, scheme, dtype)
                self.calls["triton"] += 1
                return out
            except Exception as e:  # noqa: BLE001 -- no Triton, a compile error: the eager math, same numbers
                self._fallback(e)
        w, a = _rows(weight, scale)
        path = self._path(w, a, scheme)
        try:
            if path == "prebuilt":
                out = self._runner(("forward", scheme, dtype, None))(w, a)
            elif path == "compiled":
                with _compile_settings():
                    out = _compiled(_forward)(w.detach(), a.detach(), scheme, dtype)
            elif path == "traced":
                return _forward(w, a, scheme, dtype).view(weight.shape)
        except Exception as e:  # noqa: BLE001 -- a build or compile failure: the eager math, same numbers
            self._fallback(e)
            path = "eager"
        self.calls[path] += 1
        if path == "eager":
            return functional._quantize_weight(weight, scale, scheme, dtype, None)
        return out if out.shape == weight.shape else out.view(weight.shape)

    def backward(self, weight, scale, scheme, grad, weight_grad: bool = True, scale_grad: bool = True):
        """(∂L/∂W, ∂L/∂α) from g = ∂L/∂Ŵ, as ``functional.quantize_backward``; None where not asked for."""
        if self._uses_triton(weight, scale, scheme, grad=grad):
            try:
                out = _triton().backward(weight, scale, scheme, grad, weight_grad, scale_grad)
                self.calls["triton"] += 1
                return out
            except Exception as e:  # noqa: BLE001
                self._fallback(e)
        w, a = _rows(weight, scale)
        path = self._path(w, a, scheme)
        try:
            g = grad.contiguous()
            if g.shape != w.shape:
                g = g.view(w.shape)
            if path == "prebuilt":
                kernel = self._runner(("backward", scheme, g.dtype, w.shape[1] > LONG_ROW))
                gw, ga = kernel(w, a, g, self._grad_scale(weight, scheme))
            elif path == "compiled":
                with _compile_settings():
                    gw, ga = _compiled(_backward)(w.detach(), a.detach(), scheme, g, self._grad_scale(weight, scheme))
            elif path == "traced":
                gw, ga = _backward(w, a, scheme, g, functional.gradient_scale(weight.numel(), scheme))
        except Exception as e:  # noqa: BLE001
            self._fallback(e)
            path = "eager"
        if path == "eager":
            self.calls[path] += 1
            return functional._quantize_backward(weight, scale, scheme, grad, weight_grad, scale_grad, False, None)
        if path != "traced":
            self.calls[path] += 1
        return (None if not weight_grad else gw if gw.shape == weight.shape else gw.view(weight.shape),
                None if not scale_grad else ga if ga.shape == scale.shape else ga.view(scale.shape))

    def _uses_triton(self, weight, scale, scheme, grad=None, dtype=None) -> bool:
        """Whether a call goes to the Triton kernels: CUDA tensors (any with ``triton=True``) the
        kernels take (``triton_kernels.supports``), outside a caller's ``torch.compile``."""
        if self.failed or self.triton is False or torch.compiler.is_compiling():
            return False
        if not (self.triton or weight.device.type == "cuda"):
            return False
        return _triton_supports(weight, scale, scheme, grad, dtype)

    def _path(self, w: torch.Tensor, a: torch.Tensor, scheme) -> str:
        """Which way a call goes: "traced" (inside a caller's ``torch.compile``: the plain formulas,
        traced into its graph), "prebuilt" (a CPU kernel built ahead of time), "compiled"
        (``torch.compile``) or "eager" (after a failure, rows no kernel built ahead takes, or CUDA
        tensors the Triton kernels do not take). The "triton" path is chosen before (``_uses_triton``)."""
        if torch.compiler.is_compiling():
            return "traced"
        if self.failed:
            return "eager"
        if w.device.type == "cuda" and self.triton is not False:
            return "eager"  # a call the Triton kernels do not take (torch.compile's division is approximate there)
        if w.device.type != "cpu" or not self.ahead_of_time or not _registered(scheme):
            return "compiled"
        return "prebuilt" if _takes(w, a) else "eager"

    # -- loading -------------------------------------------------------------------------------
    def load(self, keys) -> int:
        """Build (children in parallel, where not on disk) and load the kernels ``keys`` names
        (``(name, scheme, dtype, long rows)``); returns how many were built. Raises on failure."""
        todo = {key: job(key) for key in dict.fromkeys(keys) if key not in self._runners}
        missing = {j["path"]: j for j in todo.values() if j["path"] not in _PACKAGES and not Path(j["path"]).exists()}
        if missing:
            build(list(missing.values()))
        for key, j in todo.items():
            self._runners[key] = load(j)
        return len(missing)

    def loaded(self) -> list[tuple]:
        """The keys of the kernels this object has loaded."""
        return list(self._runners)

    def _runner(self, key: tuple):
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = load(job(key))
        return runner

    def _grad_scale(self, weight: torch.Tensor, scheme) -> torch.Tensor:
        key = (weight.numel(), scheme.grad_qp, weight.device)
        s_g = self._grad_scales.get(key)
        if s_g is None:
            s_g = self._grad_scales[key] = torch.tensor(functional.gradient_scale(key[0], scheme), dtype=torch.float32,
                                                        device=weight.device)
        return s_g

    def _fallback(self, error: Exception) -> None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        logger.warning("fused quantizer kernels unavailable (%s: %s); using the eager quantizer",
                       type(error).__name__, first)
        self.failed = True


def _triton():
    """``paretoq.quant.triton_kernels`` (imports Triton: only when a call goes there)."""
    from paretoq.quant import triton_kernels

    return triton_kernels


def _triton_supports(weight, scale, scheme, grad, dtype) -> bool:
    """``triton_kernels.supports`` without importing Triton for a call it would refuse anyway; True
    when Triton is missing, so that the call fails once (a warning) and runs the eager math."""
    if weight.dtype not in (torch.float32, torch.bfloat16) or scale.dtype != torch.float32:
        return False
    try:
        kernels = _triton()
    except ImportError:
        return True
    return kernels.supports(weight, scale, scheme, grad, dtype)


def _takes(w: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether a kernel built ahead of time takes these rows: fp32, contiguous, sizes ≥ 2."""
    return (w.dtype == _F32 and a.dtype == _F32 and w.shape[0] >= MIN_SIZE and w.shape[1] >= MIN_SIZE
            and w.is_contiguous() and a.is_contiguous())


def prebuild(schemes, dtype: torch.dtype) -> FusedKernels | None:
    """``FusedKernels`` with the CPU kernels that training ``schemes`` in ``dtype`` calls built (where
    not on disk) and loaded: Ŵ in ``dtype``; ∂L/∂W from a ``dtype`` gradient (each micro-batch) or an
    fp32 one (the fake-quant cache's sum), on short and long rows. ``paretoq train`` calls it before
    loading the model, so the build's child processes never share memory with training. None, after
    one warning, if they cannot be built."""
    kernels = FusedKernels()
    keys = []
    for scheme in schemes:
        keys.append(("forward", scheme, dtype, None))
        keys += [("backward", scheme, grad, long) for grad in dict.fromkeys((dtype, _F32)) for long in (False, True)]
    try:
        kernels.load(keys)
    except (BuildError, RuntimeError, OSError, KeyError) as e:
        kernels._fallback(e)
        return None
    return kernels


def set_kernels(model, kernels="fused"):
    """Choose the quantizer of every ``QuantLinear`` in ``model`` (a module, or an iterable of
    ``QuantLinear`` layers): ``"eager"`` (``functional.py``'s math), ``"fused"`` (one
    ``FusedKernels`` shared by the layers; on CPU the kernels are built ahead of time, once per
    machine, at their first call or by ``prebuild``; on CUDA the Triton kernels), ``"auto"`` (fused
    for layers whose weights are on the CPU or a CUDA GPU, eager elsewhere: what ``paretoq train
    --compile_quantizer auto`` does), or a
    ``FusedKernels`` (None = eager). Same Ŵ and ∂L/∂W bits either way, ∂L/∂α to summation order.
    Returns the ``FusedKernels`` the layers got, or None."""
    from paretoq.quant.linear import QuantLinear

    if isinstance(kernels, str):
        if kernels not in KERNEL_CHOICES:
            raise ValueError(f"kernels={kernels!r}: use one of {', '.join(KERNEL_CHOICES)} (or a FusedKernels)")
        chosen = None if kernels == "eager" else FusedKernels()
    elif kernels is None or isinstance(kernels, FusedKernels):
        chosen = kernels
    else:
        raise TypeError(f"kernels must be 'eager', 'fused', 'auto', a FusedKernels or None, not {type(kernels).__name__}")
    layers = model.modules() if isinstance(model, nn.Module) else model
    used = None
    for m in layers:
        if isinstance(m, QuantLinear):
            m.kernels = None if kernels == "auto" and m.weight.device.type not in AUTO_DEVICES else chosen
            used = used or m.kernels
    return used


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for job_ in json.loads(Path(argv[0]).read_text()):
        _build_one(job_)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    sys.exit(main())
