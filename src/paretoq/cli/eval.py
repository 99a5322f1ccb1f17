"""``paretoq eval``: perplexity on a data file and/or lm-eval tasks, for a plain, fake-quant or
packed model folder (all load through ``paretoq.loading.load_model``).

    paretoq eval --model DIR --data eval.jsonl [--context N] [--stride S] [--output results.json]
    paretoq eval --model DIR --tasks kjv_cloze[,arc_easy,...] [--limit 100] [--include_path tasks/]
"""

from __future__ import annotations

import sys
from pathlib import Path

from paretoq.cli.common import add_model_argument, model_argument
from paretoq.errors import ArgumentParser, UserError

DTYPES = ("auto", "fp32", "bf16", "fp16")


def make_parser() -> ArgumentParser:
    p = ArgumentParser(prog="paretoq eval", description="Perplexity (same tokenisation as training: documents + "
                       "EOS, concatenated) and lm-eval tasks of a model folder.")
    add_model_argument(p, "model folder (plain, fake-quant or packed)")
    p.add_argument("--data", help="text file for perplexity (JSONL {\"text\": ...}, .json, .txt, .parquet)")
    p.add_argument("--context", type=int, help="tokens per window (default: model_max_length from the folder's "
                   "paretoq_config.yaml, else min(2048, max_position_embeddings))")
    p.add_argument("--stride", type=int, help="tokens between window starts (default = context: non-overlapping); "
                   "smaller = sliding window, each window scores only its last STRIDE tokens")
    p.add_argument("--batch_size", type=int, default=4, help="windows (or lm-eval requests) per forward (4)")
    p.add_argument("--max_windows", type=int, help="evaluate only the first K windows")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="compute dtype (auto: as saved in the folder)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated (e.g. kjv_cloze,arc_easy); needs paretoq[eval]")
    p.add_argument("--include_path", action="append", help="folder of extra lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, help="lm-eval: examples per task (a fraction if < 1)")
    p.add_argument("--num_fewshot", type=int, help="lm-eval: few-shot examples")
    p.add_argument("--list_tasks", action="store_true", help="list the lm-eval tasks available offline and exit")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    return p


def evaluate_folder(args) -> dict:
    """Load the model once, then perplexity and/or lm-eval; returns the results dict."""
    import torch

    from paretoq.eval.perplexity import default_context, perplexity_of_file
    from paretoq.loading import inspect_folder, load_model, load_tokenizer

    tasks = manager = None
    if args.tasks is not None:
        from paretoq.eval.harness import check_tasks, parse_task_list

        tasks = parse_task_list(args.tasks)
        manager = check_tasks(tasks, args.include_path)  # before the model loads: a typo fails fast
    if args.data is not None and not Path(args.data).exists():
        raise UserError(f"--data {args.data}: no such file or folder")
    info = inspect_folder(args.model)
    dtype = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model = load_model(args.model, dtype=dtype)
    tokenizer = load_tokenizer(args.model)
    qc = info.quantization_config or {}
    out: dict = {"model": str(args.model), "format": info.format, "w_bits": qc.get("w_bits", 16),
                 "group_size": qc.get("group_size"), "overrides": len(qc.get("overrides") or []),
                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    if args.data is not None:
        context = args.context or default_context(info.path, info.config)
        res = perplexity_of_file(model, tokenizer, args.data, context, args.stride, args.batch_size,
                                 args.max_windows, progress=not args.no_progress)
        out["perplexity"] = res.to_dict()
    if tasks is not None:
        from paretoq.eval.harness import run_tasks

        out["lm_eval"] = run_tasks(model, tokenizer, tasks, include_path=args.include_path,
                                   batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                                   manager=manager)
    return out


def format_results(out: dict) -> str:
    from paretoq.eval.report import format_table

    fmt = out["format"] if out["format"] == "plain" else f"{out['format']}, {out['w_bits']}-bit" + (
        f", group {out['group_size']}" if out.get("group_size") else "") + (
        f" default + {out['overrides']} per-layer override(s)" if out.get("overrides") else "")
    lines = [f"model  {out['model']} ({fmt}, {out['dtype']})"]
    rows = []
    if "perplexity" in out:
        p = out["perplexity"]
        lines.append(f"data   {p['data']}: {p['tokens']:,} tokens; {p['windows']:,} windows of {p['context']} "
                     f"(stride {p['stride']}), {p['scored_tokens']:,} tokens scored in {p['seconds']:.1f} s")
        name = Path(p["data"]).name
        rows += [[name, "perplexity", p["perplexity"], None], [name, "loss (nats/token)", p["loss"], None]]
    for task, metrics in out.get("lm_eval", {}).get("tasks", {}).items():
        for name, value in metrics.items():
            if name.endswith("_stderr") or name == "sample_len":
                continue
            stderr = metrics.get(f"{name}_stderr")
            rows.append([task, name, value, stderr if isinstance(stderr, float) else None])
    return "\n".join(lines + ["", format_table(["data / task", "metric", "value", "stderr"], rows)])


def main(argv: list[str]) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    model_argument(parser, args)
    if args.list_tasks:
        from paretoq.eval.harness import available_tasks, local_task_names

        local = set(local_task_names(args.include_path))
        for name in available_tasks(args.include_path):
            print(f"{name}  (local)" if name in local else name)
        return 0
    if args.data is None and args.tasks is None:
        raise UserError("nothing to evaluate: give --data FILE (perplexity) and/or --tasks NAMES (lm-eval)")
    for flag in ("context", "batch_size", "max_windows"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be at least 1, got {value}")
    if args.stride is not None and not 1 <= args.stride <= (args.context or args.stride):
        raise UserError(f"--stride must be between 1 and the context ({args.context}), got {args.stride}")
    out = evaluate_folder(args)
    if args.output:
        from paretoq.eval.report import write_json

        write_json(args.output, out)
    print(format_results(out), file=sys.stdout)
    if args.output:
        print(f"\nwrote {args.output}", file=sys.stdout)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
