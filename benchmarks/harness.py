"""What the benchmark scripts share: the machine, the clock, medians with intervals, RESULTS.md.

The scripts run as ``python benchmarks/<script>.py`` from the repository root; Python then puts
``benchmarks/`` on ``sys.path``, so each imports this module as ``from harness import ...``.

- ``machine()`` / ``cpu_name()`` / ``load_average()``: what a figure was measured on;
- ``clock()``: (wall, process CPU) seconds, after the GPU's queued work when asked;
- ``median_ci()`` / ``median_cell()``: a median and its distribution-free 95% interval;
- ``add_common_args()`` / ``set_threads()``: ``--threads`` and ``--no-append``, torch's threads;
- ``parse_bits()`` / ``parse_quant()``: ``4,3,2,1.58`` and ``2:row,4:128`` as the scripts take them;
- ``command()`` / ``append_results()`` / ``replace_section()``: a section with date, machine and
  command in ``benchmarks/RESULTS.md``, in place of the older section of the same title (the file
  keeps the latest figure per benchmark; history is in git);
- ``load_reference()``: the reference quantizer (torchao 0.18's ParetoQ prototype) from ``.oracle/``.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = ("# Benchmark results\n\nThe latest figure of each benchmark in this folder, with its date, "
                  "machine and command; the history of every figure is in git.\n")
ORACLE = ROOT / ".oracle" / "torchao" / "prototype" / "paretoq" / "models" / "utils_quant.py"
REF_CODE = {1: 1, 1.58: 0, 2: 2, 3: 3, 4: 4}  # the reference spells ternary as 0


# --- the machine --------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average (other jobs on the machine)."""
    return os.getloadavg()[0]


def machine() -> str:
    """CPU, cores, GPU if any, torch version, torch's threads and the load average, in one line."""
    gpu = (f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else "")
    return (f"{cpu_name()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), load average {load_average():.1f}")


# --- timing and statistics ----------------------------------------------------------------------


def clock(cuda: bool = False) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds); with ``cuda``, once the GPU's queued kernels are done."""
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter(), time.process_time()


def median_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics x_(j) ≤ median ≤
    x_(n+1−j) with the largest j for which P(Binomial(n, ½) < j) ≤ (1 − level)/2. With fewer than 6
    values no such j exists at 95% and the interval is the full range."""
    xs = sorted(values)
    n = len(xs)
    tail, j = 0.0, 0
    while j < n // 2 and tail + math.comb(n, j) / 2 ** n <= (1 - level) / 2:
        tail += math.comb(n, j) / 2 ** n
        j += 1
    j = max(j, 1)
    return xs[j - 1], xs[n - j]


def median_cell(values) -> str:
    """"median [95% CI]" of ``values``."""
    lo, hi = median_ci(values)
    return f"{statistics.median(values):.3f} [{lo:.3f}, {hi:.3f}]"


# --- command line -------------------------------------------------------------------------------


def add_common_args(parser, threads: int = 1, append: bool = True, threads_help: str | None = None) -> None:
    """``--threads`` (torch's intra-op threads; 1 is steadier on a busy 2-core machine) and, where the
    script writes RESULTS.md, ``--no-append``."""
    parser.add_argument("--threads", type=int, default=threads,
                        help=threads_help or f"torch threads (default {threads})")
    if append:
        parser.add_argument("--no-append", action="store_true", help="print only, do not append to RESULTS.md")


def set_threads(n: int) -> None:
    torch.set_num_threads(n)


def parse_bits(text: str) -> int | float:
    """``"2"`` → 2, ``"1.58"`` → 1.58: bit widths as users spell them."""
    return float(text) if "." in text else int(text)


def parse_quant(spec: str):
    """``"2:row,4:128"`` → [(2, None), (4, 128)]: bits and group size (None = one scale per row)."""
    out = []
    for item in spec.split(","):
        bits, _, group = item.partition(":")
        out.append((parse_bits(bits), None if group in ("", "row") else int(group)))
    return out


# --- RESULTS.md ---------------------------------------------------------------------------------


def command(script: str, argv=None, python: str = "python") -> str:
    """How the script was run, as RESULTS.md shows it: ``python benchmarks/<script> <args>``."""
    args = sys.argv[1:] if argv is None else argv
    return f"{python} benchmarks/{script} {' '.join(args)}".rstrip()


def append_text(text: str) -> None:
    """Append ``text`` to RESULTS.md (created with its header if missing)."""
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(text)


def replace_section(title: str, text: str) -> None:
    """Put ``text`` (a section starting ``\n## title``) into RESULTS.md in place of the section of the
    same title, or at the end: the file keeps the latest figure per benchmark (history is in git)."""
    if not RESULTS.exists():
        RESULTS.write_text(RESULTS_HEADER, encoding="utf-8")
    old = RESULTS.read_text(encoding="utf-8")
    head = f"\n## {title}\n"
    start = old.find(head)
    if start < 0:
        append_text(text)
        return
    end = old.find("\n## ", start + len(head))
    RESULTS.write_text(old[:start] + text.rstrip("\n") + "\n" + (old[end:] if end >= 0 else ""), encoding="utf-8")


def append_results(title: str, command: str, lines: list[str], note: str = "") -> None:
    """A section ``## title`` with date, machine, command and ``note``, then ``lines`` (a table), in
    place of the last section of that title in RESULTS.md; printed too."""
    text = [f"\n## {title}\n", f"- date: {datetime.datetime.now().isoformat(timespec='minutes')}",
            f"- machine: {machine()}", f"- command: `{command}`"]
    if note:
        text.append(f"- {note}")
    text += ["", *lines, ""]
    replace_section(title, "\n".join(text))
    print("\n".join(text))


# --- the reference quantizer --------------------------------------------------------------------


def load_reference():
    """torchao 0.18's ParetoQ prototype (``utils_quant.py``), installed into ``.oracle/`` by ``make install``
    and loaded by path, so that nothing else ever imports torchao."""
    if not ORACLE.is_file():
        sys.exit(f"reference quantizer missing: {ORACLE} (run `make install`)")
    spec = importlib.util.spec_from_file_location("paretoq_reference_utils_quant", ORACLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
