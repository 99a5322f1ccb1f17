"""Crash-safe outputs of a training run: a checkpoint or results file is either complete or absent.

- Checkpoints (``QATTrainer._save_checkpoint``): the Trainer writes each
  checkpoint into a staging folder ``output_dir/.tmp-checkpoint-N/checkpoint-N``. Once every
  process has written its part (a barrier), the main process flushes the files to disk (fsync) and
  moves the folder to ``output_dir/checkpoint-N`` with one ``os.replace`` (atomic on POSIX), then
  rotates old checkpoints (``save_total_limit``). A process killed at any instant leaves either
  the finished ``checkpoint-N`` or a ``.tmp-*`` leftover, never a half-written ``checkpoint-N``.
- Resume (``latest_complete_checkpoint``): the newest ``checkpoint-N`` that holds
  ``trainer_state.json`` (the Trainer writes it last), so a partial folder left by an older
  paretoq or by plain transformers is skipped; ``remove_leftovers`` deletes ``.tmp-*`` entries;
  ``check_checkpoint_files`` refuses pickle weights and Trainer state files that hold more than
  tensors, before anything is loaded.
- ``trainer_state.json`` and the ``*_results.json`` files are written to a temporary file and
  renamed (``paretoq.files``); the final model goes through ``publish_model``: written into a
  temporary folder, then moved in file by file with ``config.json`` last, so a folder with a
  config.json always has the weights that belong to it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from paretoq.files import TMP_PREFIX, publish_files

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETION_MARKER = "trainer_state.json"  # written last by Trainer._save_checkpoint


# --- finding checkpoints -----------------------------------------------------------------------


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETION_MARKER))


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint-N`` folder with the largest N that is complete; None if there is none."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and os.path.isdir(path):
            if is_complete_checkpoint(path):
                steps.append((int(m.group(1)), path))
            else:
                logger.warning("ignoring %s: incomplete (no %s), left by an interrupted save", path, COMPLETION_MARKER)
    return max(steps)[1] if steps else None


TRAINER_PICKLES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth")


def check_checkpoint_files(checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint whose files could run code or are not what the Trainer wrote.

    The weights must be safetensors (their header is parsed; pickle weights are never read). The
    Trainer's own state files (optimizer, scheduler, RNG) are ``torch.save`` archives that the
    Trainer reads with ``torch.load(weights_only=True)``; each is opened here the same way (memory-
    mapped, so the tensors are not read), so a file holding anything but tensors and plain
    containers fails now, as one line, before any weights are loaded.
    """
    import pickle

    import torch
    from transformers.trainer_pt_utils import safe_globals

    from paretoq.errors import ModelFolderError
    from paretoq.loading import PICKLE_SUFFIXES, SAFETENSORS_INDEX, SAFETENSORS_NAME, read_safetensors_header

    folder = Path(checkpoint)
    weights = [folder / SAFETENSORS_NAME] if (folder / SAFETENSORS_NAME).is_file() else []
    if not weights and (folder / SAFETENSORS_INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelFolderError(f"{folder / SAFETENSORS_INDEX} is not a valid safetensors index: {e}") from None
        weights = [folder / n for n in names]
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name.startswith(
            ("pytorch_model", "model")))
        why = f"only {pickles[0]} (pickle weights are not read: they can run code)" if pickles else "no weights"
        raise ModelFolderError(f"checkpoint {folder} has {why}; it needs {SAFETENSORS_NAME}")
    for f in weights:
        read_safetensors_header(f)
    for f in sorted(folder.iterdir()):
        if not (f.name in TRAINER_PICKLES or re.fullmatch(r"rng_state_\d+\.pth", f.name)):
            continue
        try:
            with safe_globals():  # the numpy types the Trainer itself allows in rng_state.pth
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise ModelFolderError(f"{f} holds more than tensors and was refused (torch.load weights_only=True): "
                                   "it was not written by the Trainer; delete the checkpoint") from None
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFolderError(f"{f} is not a torch.save archive the Trainer wrote ({first}); "
                                   "delete the checkpoint") from None


def remove_leftovers(output_dir: str | os.PathLike) -> list[str]:
    """Delete the ``.tmp-*`` entries an interrupted run left in ``output_dir``; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    removed = []
    for name in sorted(os.listdir(output_dir)):
        if not name.startswith(TMP_PREFIX):
            continue
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            Path(path).unlink(missing_ok=True)
        removed.append(name)
    if removed:
        logger.info("removed %d leftover(s) of an interrupted run in %s: %s", len(removed), output_dir, ", ".join(removed))
    return removed


def publish_model(trainer, tokenizer, final_dir: str | os.PathLike) -> str:
    """``trainer.save_model`` + ``tokenizer.save_pretrained`` into ``final_dir``, crash-safe.

    Every process takes part in ``save_model`` (sharded models gather their weights); the files go
    into ``final_dir/.tmp-final-model`` and the main process moves them in with ``os.replace``,
    ``config.json`` last.
    """
    final_dir = str(final_dir)
    staging = os.path.join(final_dir, f"{TMP_PREFIX}final-model")
    if trainer.args.should_save:
        os.makedirs(final_dir, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        publish_files(staging, final_dir)  # config.json last
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return final_dir
