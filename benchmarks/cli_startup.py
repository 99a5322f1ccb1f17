"""How long `import paretoq` and the CLI's help take to start, next to `import torch` (issue #32).

Each command runs ``--repeats`` times in a fresh process, the commands interleaved round by round so
that load on a shared machine hits them alike; the table gives median wall seconds with their 95%
interval, and each median over `import torch`'s (the floor any PyTorch tool pays).

    python benchmarks/cli_startup.py [--repeats 7] [--no-append]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from harness import ROOT, add_common_args, append_results, command, median_cell

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "import paretoq": [sys.executable, "-c", "import paretoq"],
    "paretoq --help": [sys.executable, "-m", "paretoq", "--help"],
    "paretoq train --help": [sys.executable, "-m", "paretoq", "train", "--help"],
    "paretoq eval --help": [sys.executable, "-m", "paretoq", "eval", "--help"],
    "paretoq info --help": [sys.executable, "-m", "paretoq", "info", "--help"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    add_common_args(p)
    args = p.parse_args(argv)
    times = {name: [] for name in COMMANDS}
    for name, cmd in COMMANDS.items():  # warm the disk cache once
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
    torch_median = sorted(times["import torch"])[len(times["import torch"]) // 2]
    lines = ["| command | seconds, median [95% CI] | / import torch |", "|---|---:|---:|"]
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        lines.append(f"| `{name}` | {median_cell(ts)} | {med / torch_median:.2f} |")
    note = f"{args.repeats} fresh processes per command, interleaved"
    if args.no_append:
        print("\n".join(lines))
    else:
        append_results("CLI start-up time (cli_startup.py)", command("cli_startup.py", argv), lines, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
