"""The ``paretoq`` command: one entry point, one module per subcommand under ``paretoq.cli``.

Each subcommand module has ``main(argv: list[str]) -> int``. Mistakes a user can make raise
``paretoq.errors.UserError``; here they become one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS = {
    "train": "QAT of a model folder on a JSONL file (transformers Trainer flags accepted)",
    "eval": "perplexity (and lm-eval tasks) of a model folder",
    "export": "write a packed / hf / gguf copy of a quantized model",
    "generate": "generate text from a model folder",
    "sweep": "QAT at several bit widths, then the Pareto table and plot",
    "allocate": "per-layer bit widths under a size budget (mixed precision), as a QuantConfig YAML",
    "info": "parameters, bits, bytes and quantized layers of a model folder",
    "demo": "the whole pipeline on a real small LM (SmolLM2-135M), offline",
}


def _usage() -> str:
    lines = ["usage: paretoq <command> [options]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    lines += ["", "paretoq <command> --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from paretoq import __version__

        print(f"paretoq {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"paretoq: error: unknown command {name!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not any(a in ("-h", "--help") for a in rest):  # help text needs no logging set up (nor transformers)
        _setup_output()
    from paretoq.errors import UserError

    try:
        module = importlib.import_module(f"paretoq.cli.{name}")
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"paretoq {name}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the user gave that the system refuses (permissions, full disk, ...)
        where = f"{e.filename}: " if e.filename else ""
        print(f"paretoq {name}: error: {where}{_one_line(OSError(e.strerror or e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"paretoq {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `paretoq info DIR | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _setup_output() -> None:
    """paretoq's own log lines (INFO, rank 0 only) go to stderr; other libraries only warn there.
    Loading bars are drawn on a terminal only, so a piped stderr holds messages, not bars."""
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("paretoq").setLevel(level)
    # DeepSpeed's logger prints to stdout; its "Setting accelerator to CPU" on every import is noise on a
    # machine without a GPU (the filter stays on the logger object DeepSpeed configures when imported)
    logging.getLogger("DeepSpeed").addFilter(_NotAcceleratorGuess())
    # torchao (lean mode's optimizers; transformers imports it whenever it is installed) warns on import about
    # each GPU extension it cannot load and each Enum it registers with torch.compile: noise here
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(_NotEnumRegistration())
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class _NotAcceleratorGuess(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


class _NotEnumRegistration(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in str(record.msg)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())

