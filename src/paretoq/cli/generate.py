"""``paretoq generate``: stream a completion from a model folder (plain, fake-quant or packed)."""

from __future__ import annotations

import sys
import time

from paretoq.cli.common import add_model_argument, model_argument
from paretoq.errors import ArgumentParser, UserError


def make_parser() -> ArgumentParser:
    p = ArgumentParser(prog="paretoq generate", description="Generate text from a model folder, streamed to stdout.")
    add_model_argument(p, "model folder (plain, fake-quant or packed)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling threshold when sampling")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="compute dtype; auto = the folder's (packed folders: bf16, using the int4 CPU kernel)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow a folder's own Python model code")
    return p


def main(argv: list[str]) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    model_argument(parser, args)
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be ≥ 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must lie in (0, 1], got {args.top_p}")
    import torch
    from transformers import TextStreamer

    from paretoq.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    model = load_model(args.model, dtype=None if args.dtype == "auto" else args.dtype,
                       trust_remote_code=args.trust_remote_code)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    if inputs["input_ids"].shape[1] == 0:
        raise UserError("--prompt gives no tokens: give some text")
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                             top_k=None, streamer=streamer, pad_token_id=pad)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs["input_ids"].shape[1]
    print(f"[{new} tokens in {seconds:.2f} s, {new / seconds:.1f} tokens/s]", file=sys.stderr)
    return 0
