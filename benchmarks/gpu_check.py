"""The device check of issue #29: the GPU tests and the GPU benchmarks in one run, under 8 minutes on
one H100, every table written to a folder.

    python benchmarks/gpu_check.py OUT              # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py OUT --dry-run    # on CPU: every part with tiny shapes (gpu tests skip)

Each part runs in its own process with a time box (one that runs over is killed, reported, and the
next part starts), most important first; the whole run stops starting parts at ``--budget`` s:

1. ``env``: torch, CUDA, GPU and Triton versions.
2. ``triton-tests``: the fused quantizer's Triton kernels bit for bit against the eager quantizer on
   the GPU (``tests/test_cuda.py``: fused / triton / torch_compile tests) and in Triton's
   interpreter (``tests/quant/test_triton_kernels.py``).
3. ``qat-overhead``: ``qat_overhead.py --device cuda`` on MiniCPM4-0.5B's shapes, bf16 autocast,
   fp32 master weights, at 1×2048 and 4×2048 tokens, 2 bit per row and 4 bit per group of 128:
   QAT / FP step time with the fused quantizer (``ours``; goals ≤ 1.10 at 1×2048, ≤ 1.05 at
   4×2048) and with the eager one, and peak GPU memory QAT / FP (goal ≤ 1.05), modes interleaved
   step by step in one process.
4. ``scale``: ``benchmarks/scale.py --device cuda --short`` (0.5B and 8B shapes: bytes per
   parameter, peak memory, step time, tokens/s, FP / QAT / QAT lean), its tables in OUT/scale/.
5. ``gpu-tests``: the other ``gpu``-marked tests (MiniCPM on the GPU, ``paretoq train`` there).

OUT gets ``summary.md`` (per part: command, exit status, seconds, and the tables it printed),
``<part>.log`` (everything it printed), ``gpu-tests.xml`` / ``triton-tests.xml`` (JUnit) and
``RESULTS.md`` (``benchmarks/RESULTS.md`` after the run, with the sections the benchmarks wrote:
date, machine and command; not in a dry run, which appends nothing).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
TRITON_TESTS = "fused or triton or torch_compile"


def parts(out: Path, dry_run: bool) -> list[tuple[str, int, list[str]]]:
    """(name, time box in seconds, command) of each part, in order."""
    env_code = ("import torch, platform; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                "'available', torch.cuda.is_available()); "
                "print('gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None); "
                "import triton; print('triton', triton.__version__); print('python', platform.python_version())")
    if dry_run:
        overhead = ["--device", "cpu", "--model", "tiny", "--batch", "1x64", "--precision", "bf16", "--quant", "2:row",
                    "--modes", "fp,ours,eager", "--steps", "2", "--warmup", "1", "--no-append"]
        scale = ["--shapes", "tiny", "--batches", "1x64", "--steps", "2", "--no-append"]
    else:
        overhead = ["--device", "cuda", "--model", "minicpm4-0.5b", "--batch", "1x2048,4x2048", "--precision", "bf16",
                    "--quant", "2:row,4:128", "--modes", "fp,ours,eager", "--steps", "21", "--warmup", "3"]
        scale = ["--device", "cuda", "--short"]
    pytest = [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra"]
    return [
        ("env", 60, [PY, "-c", env_code]),
        ("triton-tests", 150, [*pytest, "tests/test_cuda.py", "tests/quant/test_triton_kernels.py", "-k", TRITON_TESTS,
                               f"--junitxml={out / 'triton-tests.xml'}"]),
        ("qat-overhead", 120, [PY, "benchmarks/qat_overhead.py", *overhead]),
        ("scale", 200, [PY, "benchmarks/scale.py", *scale, "--out", str(out / "scale")]),
        ("gpu-tests", 100, [*pytest, "-m", "gpu", "tests/test_cuda.py", "-k", f"not ({TRITON_TESTS})",
                            f"--junitxml={out / 'gpu-tests.xml'}"]),
    ]


def tables(name: str, log: str) -> str:
    """What a part printed that the summary keeps: all of ``env``; else markdown table lines, the
    kernel paths, pytest's outcome lines and errors."""
    lines = log.splitlines()[1:]  # after the command
    if name != "env":
        lines = [line for line in lines if line.startswith("|") or "calls by path" in line
                 or re.search(r"\d+ (passed|failed|skipped|deselected|errors?)\b", line)
                 or line.startswith(("FAILED", "ERROR")) or "Error" in line]
    return "\n".join(lines[-80:])


def run_part(name: str, limit: int, cmd: list[str], out: Path, env: dict) -> tuple[str, float]:
    started = time.perf_counter()
    log_path = out / f"{name}.log"
    if name == "scale" and not (ROOT / "benchmarks" / "scale.py").is_file():
        log_path.write_text("benchmarks/scale.py is not in this tree (the lean helper's benchmark): skipped\n")
        return "missing", 0.0
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        except subprocess.TimeoutExpired:
            status = f"killed after its {limit} s time box"
    return status, time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for the tables and logs (created)")
    p.add_argument("--dry-run", action="store_true", help="on CPU, tiny shapes: check that every part runs")
    p.add_argument("--budget", type=float, default=470, help="no part starts after this many seconds")
    p.add_argument("--only", default=None, help="comma list of parts to run (default: all)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    env.pop("TRITON_INTERPRET", None)  # the GPU tests need the real kernels (the interpreter tests set it themselves)
    env.pop("PARETOQ_COMPILE_QUANTIZER", None)
    started = time.perf_counter()
    summary = [f"# Device check ({'dry run, CPU' if args.dry_run else 'GPU'}), "
               f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", ""]
    failed = False
    for name, limit, cmd in parts(out, args.dry_run):
        if args.only and name not in args.only.split(","):
            continue
        left = args.budget - (time.perf_counter() - started)
        if left < 20:
            summary += [f"## {name}: not started (budget of {args.budget:.0f} s spent)", ""]
            failed = True
            continue
        status, seconds = run_part(name, int(min(limit, left)), cmd, out, env)
        failed |= status not in ("ok",)
        print(f"{name}: {status} ({seconds:.0f} s)", flush=True)
        summary += [f"## {name}: {status}, {seconds:.0f} s", "", "    " + " ".join(cmd), "",
                    tables(name, (out / f"{name}.log").read_text()), ""]
        (out / "summary.md").write_text("\n".join(summary) + "\n")
    summary.append(f"total {time.perf_counter() - started:.0f} s")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    if not args.dry_run:
        shutil.copy(ROOT / "benchmarks" / "RESULTS.md", out / "RESULTS.md")
    print(f"total {time.perf_counter() - started:.0f} s; tables in {out / 'summary.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
