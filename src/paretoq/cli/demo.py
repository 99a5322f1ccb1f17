"""``paretoq demo``: the whole pipeline on SmolLM2-135M and KJV text (see paretoq.demo)."""

from __future__ import annotations

from paretoq.errors import ArgumentParser


def main(argv: list[str]) -> int:
    from paretoq.demo import DEMO_DEFAULTS, run_demo

    p = ArgumentParser(prog="paretoq demo", description="FP → RTN → QAT → packed, on a real small LM")
    p.add_argument("--output_dir", default="demo_output")
    p.add_argument("--max_steps", type=int, default=DEMO_DEFAULTS["max_steps"])
    p.add_argument("--w_bits", default=DEMO_DEFAULTS["w_bits"])
    p.add_argument("--prepare", action="store_true",
                   help="only convert SmolLM2-135M and write the KJV text into <output_dir>/cache, then stop")
    args = p.parse_args(argv)
    run_demo(args.output_dir, max_steps=args.max_steps, w_bits=args.w_bits, prepare_only=args.prepare)
    return 0
