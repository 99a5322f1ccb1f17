"""``paretoq train``: QAT of a model folder on a JSONL file; every TrainingArguments flag works."""

from __future__ import annotations

import json
import sys

from paretoq.training.args import make_parser, parse_train_args


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        make_parser().print_help()
        return 0
    cfg = parse_train_args(argv)  # flag mistakes end here, before the Trainer is imported
    from paretoq.training.run import run_training

    metrics = run_training(cfg)
    if cfg.training.process_index == 0:
        print(json.dumps({k: metrics[k] for k in ("eval_loss", "perplexity", "final_model_dir") if k in metrics}),
              file=sys.stdout)
    return 0
