"""A function compiled by ``torch.compile`` (Inductor) and then called without Dynamo's per-call work.

A call of a ``torch.compile``d function on a small input costs ~75 µs of Python around a kernel
that itself takes a few: Dynamo's frame hook, AOTAutograd's runtime wrappers, Inductor's output
wrapper. The quantizer pays that twice per layer per step (forward, backward), which at small
micro-batches is a good part of QAT's whole overhead. ``Kernel`` keeps what Dynamo compiled and
calls it itself:

- each compilation goes through Dynamo and Inductor as usual (its disk caches included), and
  ``Kernel`` keeps three things of it: Dynamo's guards for it (the checks that decide whether a
  call may reuse it: dtypes, devices, ranks, the 0/1 sizes and the equalities of dynamic shapes,
  grad / autocast / inference mode, the identity of every global it read), Inductor's compiled
  graph, and where each graph input comes from in the call's arguments (Dynamo's own source
  expressions, e.g. ``L['w'].size()[1]``);
- a call evaluates those guards (Dynamo's C++ guard tree, ~5 µs) and, when they pass, runs the
  compiled graph on the gathered inputs (~10 µs); when none pass it goes through Dynamo, which
  recompiles as it would anyway.

So a call runs exactly what ``torch.compile`` would run, under the same guards. What it skips is
AOTAutograd's runtime wrapper, which has nothing to do for these functions: they take no input
that requires grad (callers detach), mutate no input and return fresh tensors. A compilation is
only kept after its first call gave the same outputs both ways; anything unexpected (another
PyTorch's internals, a backend other than Inductor, a dispatch mode such as a FLOP counter being
active) leaves the call on the ordinary ``torch.compile`` path, and inside a caller's own
``torch.compile`` the plain function is traced into the caller's graph.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch._dynamo
import torch.fx.experimental._config as shape_config


def _same(x, y) -> bool:
    """Equal, or (a reduction split differently on a GPU) equal up to summation order."""
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
            and x.shape == y.shape):
        return False
    if torch.equal(x, y):
        return True
    x, y = x.float(), y.float()
    largest = float(x.abs().nan_to_num().max()) if x.numel() else 0.0
    return torch.allclose(x, y, rtol=1e-4, atol=1e-6 * largest, equal_nan=True)


def _outputs_match(traced, direct) -> bool:
    """``direct`` (the graph's output list) holds ``traced`` (the compiled function's result)."""
    expected = (traced,) if isinstance(traced, torch.Tensor) else traced
    if not isinstance(expected, tuple) or len(expected) != len(direct):
        return False
    return all(_same(x, y) for x, y in zip(expected, direct))


class Kernel:
    """``fn`` (tensor arguments in, fresh tensors out) compiled with dynamic shapes; call it as ``fn``.

    Compiled with Python floats as constants (by default Dynamo passes a module float such as the
    floor of α̃ into the kernel as a 0-d tensor made on every call) and without "duck sizing" (by
    default dimensions that happen to be equal at the first call, like a square weight's rows and
    columns, become one symbol and the first non-square call recompiles).

    ``compile_graph(gm, example_inputs, graphs)`` is the backend Dynamo hands each graph to (default:
    Inductor, as ``torch.compile``); it appends to ``graphs`` each Inductor graph it compiles. Call
    with every argument, positionally.
    """

    def __init__(self, fn: Callable, compile_graph: Callable | None = None):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, backend=self._compile)
        self._compile_graph = compile_graph or self._inductor
        self._names = tuple(inspect.signature(fn).parameters)
        self._entries: list[tuple] = []  # (guards, gather, graph, single output)
        self._new: list[tuple] = []  # what the compilations of the current Dynamo call produced

    def __call__(self, *args):
        if torch.compiler.is_compiling():  # inside a caller's torch.compile: the plain math, traced into its graph
            return self.fn(*args)
        f_locals = dict(zip(self._names, args))
        if not torch._C._len_torch_dispatch_stack():  # under a dispatch mode Dynamo runs eager code
            for guards, gather, graph, single in self._entries:
                if guards.check(f_locals):
                    out = graph(gather(f_locals))
                    return out[0] if single else tuple(out)
        return self._call_dynamo(args, f_locals)

    def forget(self) -> None:
        """Drop the kept compilations (Dynamo's own cache is ``torch._dynamo.reset()``'s)."""
        self._entries = []

    def _call_dynamo(self, args, f_locals):
        self._new = []
        with torch._dynamo.config.patch(specialize_float=True), shape_config.patch(use_duck_shape=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):  # the cache would skip Inductor's graph
            out = self.compiled(*args)
        new, self._new = self._new, []
        if len(new) == 1 and new[0][2] is not None:  # one whole-function graph, compiled by Inductor
            self._keep(*new[0], out, f_locals)
        return out

    def _keep(self, compile_id, gather, graph, out, f_locals) -> None:
        try:
            entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(self.fn.__code__)
            guards = next(e.guard_manager for e in entries if str(e.compile_id) == compile_id)
            direct = graph(gather(f_locals))
            if guards.check(f_locals) and _outputs_match(out, direct):
                self._entries.insert(0, (guards, gather, graph, isinstance(out, torch.Tensor)))
        except Exception:  # noqa: BLE001 -- internals not as expected: stay on torch.compile's path
            pass

    def _compile(self, gm: torch.fx.GraphModule, example_inputs):
        """Dynamo's backend: Inductor, keeping its graph and the inputs' source expressions."""
        compile_id = str(torch._guards.CompileContext.current_compile_id())
        try:
            names = [node.meta["grapharg"].source.name for node in gm.graph.nodes if node.op == "placeholder"]
            # Dynamo's source expressions over the frame's locals L and the function's globals G
            gather = eval("lambda L: [" + ", ".join(names) + "]", {"G": self.fn.__globals__})  # noqa: S307
        except Exception:  # noqa: BLE001
            gather = None
        graphs = []
        compiled = self._compile_graph(gm, example_inputs, graphs)
        self._new.append((compile_id, gather, graphs[0] if gather is not None and len(graphs) == 1 else None))
        return compiled

    @staticmethod
    def _inductor(gm, example_inputs, graphs: list):
        """What ``torch.compile``'s default backend does, noting each graph Inductor compiles."""
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        def inner(graph_module, inputs, **kwargs):
            graph = compile_fx_inner(graph_module, inputs, **kwargs)
            graphs.append(graph)
            return graph

        return compile_fx(gm, example_inputs, inner_compile=inner)
