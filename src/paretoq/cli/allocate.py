"""``paretoq allocate``: per-layer bit widths under a size budget, written as a QuantConfig YAML.

    paretoq allocate --model DIR --data train.jsonl --budget 2.5 [--out alloc.yaml]
                     [--candidates 1.58,2,3,4] [--scale_init reference] [--calibration_samples 16]
    paretoq train --quant_config alloc.yaml ...   # trains that mix

The method (sensitivity estimate, byte costs, exact allocation): ``paretoq.allocate``.
"""

from __future__ import annotations

import json
import shlex
import sys

from paretoq.cli.common import add_model_argument, model_argument
from paretoq.errors import ArgumentParser, UserError


def parser() -> ArgumentParser:
    from paretoq.allocate import DEFAULT_CANDIDATES, DEFAULT_ESTIMATE, ESTIMATES

    p = ArgumentParser(prog="paretoq allocate", description="Measure each layer's sensitivity to each candidate "
                       "bit width on calibration text, then choose one per layer minimising the predicted loss "
                       "increase under a size budget; writes a QuantConfig YAML for paretoq train --quant_config.")
    add_model_argument(p, "full-precision model folder")
    p.add_argument("--data", help="calibration text: JSONL with {\"text\": ...} per line (e.g. the training file)")
    p.add_argument("--budget", type=float, help="bits per weight over the quantizable layers, codes + fp16 scales "
                   "(e.g. 2.5)")
    p.add_argument("--budget_bytes", type=int, help="the budget in bytes of the quantizable layers instead")
    p.add_argument("--out", help="QuantConfig YAML to write (default: print it)")
    p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                   help=f"per-layer choices, comma-separated: bits, bits:group, 16 = bf16 (default {DEFAULT_CANDIDATES})")
    p.add_argument("--scale_init", default="reference", help="scale init the candidates are measured with "
                   "(reference | mse | mse_act | gptq); written to the YAML")
    p.add_argument("--calibration_samples", type=int, default=16, help="calibration blocks (default 16)")
    p.add_argument("--block", type=int, default=256, help="tokens per calibration block (default 256)")
    p.add_argument("--seed", type=int, default=0, help="which blocks are drawn (default 0)")
    p.add_argument("--batch_size", type=int, default=2, help="blocks per forward/backward (default 2)")
    p.add_argument("--ternary_format", default="base3", help="how 1.58-bit codes are counted: base3 (1.6 bits, "
                   "default) or 2bit; export the packed folder the same way")
    p.add_argument("--estimate", default=DEFAULT_ESTIMATE, choices=ESTIMATES, help="score of a candidate: clipped (½ Fisher term + "
                   "the first-order term where positive; default), fisher (½ Fisher term) or taylor (first-order + "
                   "Fisher term)")
    p.add_argument("--sensitivity", help="JSON file of the measured sensitivities: read if it exists (no "
                   "measurement), else written")
    return p


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    from pathlib import Path

    from paretoq.allocate import (Sensitivity, allocate, allocation_config, budget_bytes, calibration_ids,
                                  header_text, parse_candidates, sensitivity_of_folder, summary)
    from paretoq.files import atomic_write
    from paretoq.quant.config import quant_config_yaml
    from paretoq.quant.scale_init import SCALE_INITS

    if (args.budget is None) == (args.budget_bytes is None):
        raise UserError("give the budget once: --budget BITS_PER_WEIGHT (e.g. 2.5) or --budget_bytes N")
    if args.budget is not None and not args.budget > 0:
        raise UserError(f"--budget must be a positive number of bits per weight, got {args.budget}")
    if args.scale_init not in SCALE_INITS:
        raise UserError(f"--scale_init {args.scale_init!r} is unknown: use one of {', '.join(SCALE_INITS)}")
    if args.ternary_format not in ("base3", "2bit"):
        raise UserError(f"--ternary_format must be base3 or 2bit, got {args.ternary_format!r}")
    candidates = parse_candidates(args.candidates)
    cached = Path(args.sensitivity) if args.sensitivity else None
    if cached is not None and cached.is_file():
        try:
            sens = Sensitivity.from_dict(json.loads(cached.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"--sensitivity {cached}: not a sensitivity file of paretoq allocate ({e})") from None
        if [(c.bits, c.group) for c in sens.candidates] != [(c.bits, c.group) for c in candidates]:
            raise UserError(f"--sensitivity {cached} was measured for candidates "
                            f"{','.join(c.label for c in sens.candidates)}, not {args.candidates}")
    else:
        model = model_argument(p, args)
        if not args.data:
            raise UserError("--data is required: the calibration text (JSONL) the sensitivities are measured on")
        if args.calibration_samples < 1 or args.block < 2 or args.batch_size < 1:
            raise UserError("--calibration_samples and --batch_size must be ≥ 1 and --block ≥ 2")
        calib = calibration_ids(model, args.data, args.calibration_samples, args.block, args.seed)
        sens = sensitivity_of_folder(model, calib, candidates, args.scale_init, args.batch_size)
        if cached is not None:
            atomic_write(cached, json.dumps(sens.to_dict()))
    budget = args.budget_bytes if args.budget_bytes is not None else budget_bytes(sens, args.budget)
    alloc = allocate(sens, budget, args.ternary_format, estimate=args.estimate)
    config = allocation_config(sens, alloc, args.scale_init)
    text = quant_config_yaml(config, header_text(sens, alloc, "paretoq allocate " + shlex.join(argv)))
    if args.out:
        atomic_write(args.out, text)
        s = summary(sens, alloc)
        print(f"wrote {args.out}: {s['bits_per_weight']:.4f} bits/weight (budget {s['budget_bits_per_weight']:.4f}), "
              f"predicted loss increase {alloc.loss:.4g}; {len(config.overrides)} per-layer override(s); "
              f"sensitivity measured in {sens.seconds:.0f} s", file=sys.stdout)
    else:
        print(text, file=sys.stdout)
    return 0
