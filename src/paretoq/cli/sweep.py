"""``paretoq sweep``: QAT at several bit widths, then sweep.md / sweep.csv / sweep.json / pareto.png.

    paretoq sweep --input_model_filename DIR --train_data_local_path train.jsonl
                  --eval_data_local_path eval.jsonl --output_dir runs/sweep
                  [--bits 4,3,2,1.58,1] [--group_sizes none,64] [--tasks kjv_cloze]
                  [any paretoq train flag: --max_steps 30 --learning_rate 1e-4 --bf16 ...]
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from paretoq.sweep import parse_sweep_args, sweep_parser

    if any(a in ("-h", "--help") for a in argv):
        sweep_parser().print_help()
        print("\nEvery `paretoq train` flag is accepted as well (see paretoq train --help); each bit width's "
              "model goes to <output_dir>/w<bits>[-g<group>].")
        return 0
    settings = parse_sweep_args(argv)
    from paretoq.sweep import run_sweep, sweep_command

    rows, files = run_sweep(settings, command=sweep_command(argv))
    print(files["md"].read_text(), file=sys.stdout)
    print("wrote " + ", ".join(str(p) for p in files.values()), file=sys.stdout)
    return 0
