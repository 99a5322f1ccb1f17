"""paretoq's registrations with transformers, made when transformers' machinery loads (``import paretoq``).

``import paretoq`` registers with transformers the MiniCPM model type (``AutoConfig``, ``AutoModel``,
``AutoModelForCausalLM``; ``paretoq.models``) and the ``quant_method: "paretoq"`` loader (its quantizer
registry; ``paretoq.hf_integration``). Each is registered once the transformers module holding its
registry is imported: at once if it already is, else as soon as the transformers import that loads
it has finished (the outermost one: a registry module can finish while another transformers module
that the registration itself needs is still half-imported). A hook on Python's import system does
this through ``importlib``'s documented ``MetaPathFinder`` / ``Loader`` protocol, for transformers'
modules only, and removes itself when every registration has run.

So ``import paretoq`` followed by ``AutoModelForCausalLM.from_pretrained(...)`` finds both in place,
while ``import paretoq`` itself (and the ``paretoq`` command's start and ``--help``) imports neither
torch nor transformers.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading

# transformers module whose import completes a registry → the registration ("module:function")
REGISTRIES: dict[str, str] = {
    "transformers.models.auto.configuration_auto": "paretoq.models:register_config",
    "transformers.models.auto.modeling_auto": "paretoq.models:register_model_classes",
    "transformers.quantizers.auto": "paretoq.hf_integration:register",
}
_pending: dict[str, str] = {}  # registry module not imported yet → its registration
_due: list[str] = []  # registrations whose registry is imported, waiting for the import to finish
_state = {"depth": 0, "running": False}  # transformers modules being executed; a registration running
_lock = threading.RLock()


def _transformers(name: str) -> bool:
    return name == "transformers" or name.startswith("transformers.")


def _drain() -> None:
    """Run the due registrations (never nested: one that imports modules queues the next)."""
    with _lock:
        if _state["running"] or _state["depth"]:
            return
        _state["running"] = True
    try:
        while True:
            with _lock:
                if not _due:
                    _state["running"] = False
                    if not _pending and _WATCHER in sys.meta_path:
                        sys.meta_path.remove(_WATCHER)
                    return
                target = _due.pop(0)
            module, _, name = target.partition(":")
            getattr(importlib.import_module(module), name)()
    except BaseException:
        with _lock:
            _state["running"] = False
        raise


class _Counted(importlib.abc.Loader):
    """A transformers module's own loader, counted while it runs; the registration of a registry
    module is due once it has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _lock:
            _state["depth"] += 1
        try:
            self.loader.exec_module(module)
        finally:
            with _lock:
                _state["depth"] -= 1
        with _lock:
            target = _pending.pop(module.__name__, None)
            if target is not None:
                _due.append(target)
        _drain()

    def __getattr__(self, attr):  # get_source, is_package, ... as the real loader has them
        return getattr(self.loader, attr)


class _Watcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a transformers module it asks the other finders and counts the loader."""

    def find_spec(self, fullname, path, target=None):
        if not _transformers(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _Counted):
                    spec.loader = _Counted(spec.loader)
                return spec
        return None


_WATCHER = _Watcher()


def register_with_transformers() -> None:
    """What ``import paretoq`` does (idempotent): each registration now, or when its registry loads."""
    with _lock:
        for module, target in REGISTRIES.items():
            if target in _due or module in _pending:
                continue
            if module in sys.modules:
                _due.append(target)
            else:
                _pending[module] = target
        if _pending and _WATCHER not in sys.meta_path:
            sys.meta_path.insert(0, _WATCHER)
    _drain()


def registered() -> bool:
    """Whether every registration has run."""
    return not _pending and not _due
