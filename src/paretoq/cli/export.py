"""``paretoq export``: write a packed / hf / gguf copy of a model folder."""

from __future__ import annotations

import sys
from pathlib import Path

from paretoq.cli.common import add_model_argument, model_argument
from paretoq.errors import ArgumentParser, UserError

FORMATS = ("packed", "hf", "gguf", "compressed-tensors")


def make_parser() -> ArgumentParser:
    p = ArgumentParser(prog="paretoq export", description="Write a packed (paretoq), hf (dequantized, plain "
                       "transformers), gguf (llama.cpp) or compressed-tensors (vLLM, transformers) copy of a quantized "
                       "model folder.")
    add_model_argument(p, "model folder (fake-quant from paretoq train, or packed)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--output", required=True, help="output folder (packed, hf, compressed-tensors) or .gguf file")
    p.add_argument("--scale_dtype", default="fp16", choices=("fp16", "bf16", "fp32"),
                   help="packed, compressed-tensors: dtype of the stored scales (default fp16)")
    p.add_argument("--ternary_format", default="2bit", choices=("2bit", "base3"),
                   help="packed, 1.58 bits: 2-bit codes (4 per byte) or base-3 (5 per byte)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="packed / hf / compressed-tensors: dtype of the unquantized tensors (hf: of all tensors); "
                        "default bf16")
    p.add_argument("--ct_num_bits", type=int, default=None, choices=(2, 3, 4, 8),
                   help="compressed-tensors: integer width of every layer (4 or 8 for vLLM's kernels); default: each "
                        "layer at its smallest exact width (int2 for 1 and 1.58 bits, int3 for 2 and 3, int4 for 4)")
    p.add_argument("--gguf_qtype", default=None,
                   help="gguf: GGML type(s) for the quantized layers, comma-separated, tried in order per layer "
                        "(Q1_0, Q2_0, TQ2_0, TQ1_0, Q2_K, Q3_K, Q4_0; e.g. TQ2_0 or TQ2_0,Q4_0 for the CPU-only "
                        "ternary type); default: the first exact one of Q1_0, Q2_0, Q2_K, Q3_K, Q4_0 (docs/gguf.md)")
    p.add_argument("--gguf_fallback", default="refuse", choices=("refuse", "f16"),
                   help="gguf: what to do with a layer no GGML type holds exactly: refuse (default) or write its "
                        "dequantized weight as F16")
    p.add_argument("--gguf_float_type", default="f16", choices=("f16", "f32", "bf16", "q8_0"),
                   help="gguf: type of the embeddings / untied output (norms stay F32)")
    p.add_argument("--tokenizer_pre", default=None, help="gguf: llama.cpp pre-tokenizer name, if not recognised")
    p.add_argument("--check", default=None, metavar="TEXT.jsonl",
                   help="after writing, run the export in its engine (llama.cpp for gguf, transformers otherwise) on "
                        "this held-out text and print its agreement with paretoq's fake-quant model: mean KL "
                        "divergence and top-1 agreement of the next-token distributions (docs/deploy.md)")
    p.add_argument("--check_tokens", type=int, default=1000, help="--check: how many tokens to score (default 1000)")
    return p


def main(argv: list[str]) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    model_argument(parser, args)
    from paretoq.loading import model_dir

    model, output = model_dir(args.model), Path(args.output)
    if output.resolve() == model.resolve():
        raise UserError(f"--output {output} is the --model folder: choose a new path")
    from paretoq.training.preflight import check_output_dir

    # before the model loads: the output (a folder; for gguf, the file's folder) can be written
    if args.format == "gguf":
        check_output_dir(output.parent, f"--output {output}: its folder")
    else:
        check_output_dir(output, "--output")
    if args.format == "gguf":
        from paretoq.export.gguf import export_gguf

        qtype = None if args.gguf_qtype is None else tuple(t.strip() for t in args.gguf_qtype.split(",") if t.strip())
        written = export_gguf(model, output, qtype=qtype, fallback=args.gguf_fallback,
                              float_type=args.gguf_float_type, tokenizer_pre=args.tokenizer_pre)
    elif args.format == "packed":
        from paretoq.export.packed import save_packed

        written = save_packed(model, output, scale_dtype=args.scale_dtype, ternary_format=args.ternary_format,
                              dtype=args.dtype)
    elif args.format == "compressed-tensors":
        from paretoq.export.compressed_tensors import export_compressed_tensors

        written = export_compressed_tensors(model, output, num_bits=args.ct_num_bits, scale_dtype=args.scale_dtype,
                                            dtype=args.dtype)
    else:
        from paretoq.export.hf import export_hf

        written = export_hf(model, output, dtype=args.dtype)
    written = Path(written or output)
    size = sum(f.stat().st_size for f in written.rglob("*") if f.is_file()) if written.is_dir() else \
        written.stat().st_size
    print(f"wrote {args.format} export to {written} ({size / 2**20:.2f} MiB)", file=sys.stdout)
    if args.check is not None:
        from paretoq.export.check import check_export

        report = check_export(model, written, args.format, args.check, tokens=args.check_tokens)
        print(report.line(), file=sys.stdout)
    return 0
