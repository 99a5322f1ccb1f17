"""Checks a training run makes before it writes anything or reads any weights.

A user's mistake (a bad output path, a model folder that is not one, a ``group_size`` that does
not divide a layer) should cost seconds, print one line and leave no output folder behind, so
these run first: they read config.json, the safetensors headers and build the model on the meta
device only.
"""

from __future__ import annotations

import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from paretoq.errors import UserError


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> None:
    """``path`` is a folder or can be created as one, and a file can be written in it.

    Creates what is missing only to try it, and removes it again: nothing is left behind.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder")
    missing = []
    ancestor = p
    while not ancestor.exists():
        missing.append(ancestor)
        if ancestor.parent == ancestor:
            break
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"{flag} {path} cannot be created: {ancestor} is a file, not a folder")
    probe = p / f".tmp-paretoq-write-test-{os.getpid()}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise UserError(f"{flag} {path} is not writable ({e.strerror or e})") from None
    finally:
        probe.unlink(missing_ok=True)
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)  # the outermost folder this check created


def check_model_folder(path: str | os.PathLike, quant, trust_remote_code: bool = False) -> None:
    """The folder is a loadable model (config, weight headers, tensor shapes) and ``quant`` fits
    every layer it selects (``group_size`` divides ``in_features``), all without reading weights."""
    import torch

    from paretoq.loading import check_tensors, inspect_folder, skeleton
    from paretoq.quant.swap import selected_linears

    info = inspect_folder(path, trust_remote_code)
    model = skeleton(info, torch.float32, trust_remote_code)
    check_tensors(info, model)
    if quant.enabled:
        for name, linear in selected_linears(model, quant):
            quant.check_layer(name, linear.in_features)


@contextmanager
def held_logs(name: str = "paretoq"):
    """Hold the log records of logger ``name`` while the block runs: they are emitted when it
    succeeds and dropped when it raises, so a mistake found late in the preparation (the eval file,
    after the train file was tokenised) still ends in one line."""
    logger = logging.getLogger(name)
    held: list[logging.LogRecord] = []

    class _Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    handler, propagate = _Hold(level=logging.NOTSET), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    saved = [(h, logger.removeHandler(h)) for h in list(logger.handlers) if h is not handler]
    try:
        yield
    finally:
        logger.removeHandler(handler)
        for h, _ in saved:
            logger.addHandler(h)
        logger.propagate = propagate
    for record in held:  # only reached when the block succeeded
        logger.handle(record)
