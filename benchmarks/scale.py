"""Training at real MiniCPM4 shapes: memory per parameter, peak memory, step time, tokens/s.

Random-weight models with the exact shapes of MiniCPM4-0.5B and MiniCPM4-8B train a few steps
of ``QATTrainer`` (what ``paretoq train`` runs) on random tokens, each configuration in a fresh
child process:

  fp        full precision: fp32 master weights + fp32 AdamW, bf16 autocast (transformers' usual recipe)
  qat       QAT (2-bit, per row), the same precision: fp32 master + fp32 AdamW, bf16 autocast
  qat_lean  QAT (2-bit) in lean mode (``--master_weights bf16``): bf16 weights and gradients, fp32
            scales, torchao's 8-bit AdamW with stochastic rounding (``--optim``)

Reported: bytes of weights + gradients + optimizer state per parameter (``training_state_bytes``,
counted on the tensors just before the last optimizer step), peak memory (CPU: peak RSS above the
idle process, i.e. after the imports and before the model exists; GPU: ``max_memory_allocated``
after the model is built, i.e. everything training allocates), median step time over the steps
after the first (which compiles), tokens/s = tokens per step / that time. The causal-LM loss is
chunked (``--loss_chunk_size`` auto: 73,448-token logits at 2048 positions exceed its threshold).

Shapes. MiniCPM4-0.5B: /work/shared/SPEC.md §3 (hidden 1024, 24 layers, 16 heads, 2 KV heads,
FFN 4096, vocab 73,448, tied embeddings). MiniCPM4-8B: openbmb/MiniCPM4-8B's config.json as quoted
in issue #29 (hidden 4096, 32 layers, 32 heads, 2 KV heads, FFN 16384, vocab 73,448); its
``tie_word_embeddings`` could not be checked offline here and is taken as false (the larger case:
a separate 73,448 × 4096 LM head). LongRoPE with the 0.5B's constants at 32,768 positions for both
(at 2048 tokens RoPE scaling does not change the cost).

CPU (default): the 0.5B shape, fp / qat / qat_lean at 1×2048 (``--batches 1x2048,4x2048``). GPU
(``--device cuda``): both shapes; at 8B only qat_lean fits one 80 GB GPU (16 bytes/parameter ×
8.2 B = 131 GB for the others), run with gradient checkpointing at 1×2048 for 3 steps.
``--short`` is the device check (a few minutes on an H100, not yet run on one): 0.5B at 1×2048 and 4×2048,
8B lean; ``--kernels fused`` runs qat with the fused quantizer (Triton on a GPU).

    python benchmarks/scale.py                       # CPU, 0.5B, 1×2048
    python benchmarks/scale.py --device cuda --short --out /tmp/scale   # GPU device check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_common_args, append_results, command, machine, set_threads

SHAPES = {
    "0.5b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=2,
                 intermediate_size=4096, vocab_size=73448, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=2,
               intermediate_size=16384, vocab_size=73448, tie_word_embeddings=False),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,  # smoke test
                 intermediate_size=256, vocab_size=73448, tie_word_embeddings=True),
}
COMMON = dict(hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=32768,
              scale_emb=12, dim_model_base=256, scale_depth=1.4, bos_token_id=1, eos_token_id=2)
MODES = ("fp", "qat", "qat_lean")
BITS = 2


def _config(shape: str):
    from paretoq.models.minicpm_config import MiniCPMConfig

    head_dim = SHAPES[shape]["hidden_size"] // SHAPES[shape]["num_attention_heads"]
    factors = [1.0] * (head_dim // 2)  # LongRoPE factors: one per rotary frequency
    rope = {"rope_type": "longrope", "short_factor": factors, "long_factor": factors,
            "original_max_position_embeddings": 32768}
    return MiniCPMConfig(**SHAPES[shape], **COMMON, rope_scaling=rope)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a) -> dict:
    """One configuration in this (fresh) process; returns its measurements."""
    import torch
    import transformers.trainer  # noqa: F401 -- what every training process has loaded
    from transformers import TrainerCallback, TrainingArguments, default_data_collator

    from paretoq.models.minicpm import MiniCPMForCausalLM
    from paretoq.quant import QuantConfig, quantize_model
    from paretoq.quant import fused
    from paretoq.training.lean import peak_memory_bytes, quiet_torchao, to_lean, training_state_bytes
    from paretoq.training.trainer import QATTrainer

    quiet_torchao()
    if a.optim.startswith("adamw_torch_") and a.mode == "qat_lean":
        import torchao.optim  # noqa: F401
    set_threads(a.threads)
    cuda = a.device == "cuda"
    batch, length = (int(x) for x in a.batch.split("x"))
    idle = _rss_now()
    torch.manual_seed(0)
    with torch.device(a.device):
        model = MiniCPMForCausalLM(_config(a.shape))
    model.train()
    quantized = a.mode != "fp"
    kernels = None
    if quantized:
        quantize_model(model, QuantConfig(w_bits=BITS))
        kernels = "eager"  # lean mode: always (the fused kernels read fp32 weights)
        if a.mode == "qat" and a.kernels == "fused" and cuda:
            kernels = "fused"
        elif a.mode == "qat" and a.kernels in ("auto", "fused") and not cuda:  # `paretoq train`'s CPU default
            kernels = fused.prebuild([QuantConfig(w_bits=BITS).scheme], torch.bfloat16) or "eager"
    if a.mode == "qat_lean":
        to_lean(model)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(3, 73448, (batch * (a.steps + 1), length), generator=gen)]
    times, state = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_pre_optimizer_step(self, args, st, control, model=None, optimizer=None, **kw):
            if st.global_step + 1 >= st.max_steps:
                state.update(training_state_bytes(model, optimizer))

        def on_step_end(self, args, st, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=batch, max_steps=a.steps, learning_rate=1e-5,
            bf16=True, optim=a.optim if a.mode == "qat_lean" else "adamw_torch", weight_decay=0.0,
            gradient_checkpointing=a.gradient_checkpointing, save_strategy="no", report_to="none",
            logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, use_cpu=not cuda, seed=0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base_alloc = torch.cuda.memory_allocated()
        trainer = QATTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                             callbacks=[Timer()], quantizer_kernels=kernels)
        trainer.train()
    peak = peak_memory_bytes(a.device) if cuda else peak_memory_bytes() - idle
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"shape": a.shape, "mode": a.mode, "batch": a.batch, "device": a.device, "parameters": params,
            "gradient_checkpointing": a.gradient_checkpointing,
            "quantizer": "-" if kernels is None else kernels if isinstance(kernels, str) else "fused", "optim": args.optim.value if hasattr(args.optim, "value")
            else str(args.optim), "bytes_per_parameter": round(state.get("per_parameter", float("nan")), 3),
            "state_gb": round((state.get("weights", 0) + state.get("gradients", 0) + state.get("optimizer", 0)) / 1e9, 3),
            "peak_gb": round(peak / 1e9, 3), "model_gb_at_start": round(base_alloc / 1e9, 3) if cuda else None,
            "step_seconds": round(step, 3), "first_step_seconds": round(times[0], 2),
            "tokens_per_second": round(batch * length / step, 1), "steps": a.steps, "losses": losses}


def plan(a) -> list[dict]:
    runs = []
    if a.device == "cuda" and a.short:
        a.shapes, a.batches = "0.5b,8b", "1x2048,4x2048"
    for shape in a.shapes.split(","):
        for batch in a.batches.split(","):
            for mode in a.modes.split(","):
                gc = a.gradient_checkpointing
                if shape == "8b":
                    if mode != "qat_lean" or batch != "1x2048":
                        continue  # 16 bytes/parameter: 131 GB before activations, on no single GPU
                    gc = True
                runs.append({"shape": shape, "batch": batch, "mode": mode, "gradient_checkpointing": gc})
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", default=None, help="0.5b,8b (default: 0.5b on CPU, both on GPU)")
    p.add_argument("--batches", default="1x2048", help="micro-batches as BATCHxLENGTH, comma-separated")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per configuration (the first compiles)")
    p.add_argument("--optim", default="adamw_torch_8bit", help="qat_lean's optimizer")
    p.add_argument("--gradient_checkpointing", action="store_true", help="for every configuration (8B: always)")
    p.add_argument("--kernels", default="auto", choices=["auto", "eager", "fused"],
                   help="qat's quantizer: auto = paretoq train's default (fused on CPU, eager on GPU); lean: eager")
    p.add_argument("--short", action="store_true", help="GPU device check: 0.5B at 1x2048 and 4x2048, 8B lean")
    p.add_argument("--out", default=None, help="also write results.jsonl and scale.md to this folder")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    add_common_args(p, threads=os.cpu_count() or 1)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return 0
    a.shapes = a.shapes or ("0.5b,8b" if a.device == "cuda" else "0.5b")
    rows = []
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    for run in plan(a):
        cmd = [sys.executable, __file__, "--child", "1", "--shape", run["shape"], "--batch", run["batch"],
               "--mode", run["mode"], "--device", a.device, "--steps", str(a.steps), "--optim", a.optim,
               "--threads", str(a.threads), "--kernels", a.kernels] + (["--gradient_checkpointing"] if run["gradient_checkpointing"] else [])
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            row = {**run, "error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        else:
            row = json.loads(line[7:])
        row["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if out:
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    lines = table(rows)
    title = f"Real-shape training memory and speed ({'GPU' if a.device == 'cuda' else 'CPU'})"
    if out:
        (out / "scale.md").write_text(f"## {title}\n\n- machine: {machine()}\n- command: "
                                      f"`{command('scale.py', argv)}`\n\n" + "\n".join(lines) + "\n")
    if not a.no_append:
        append_results(title, command("scale.py", argv), lines,
                       note="random weights, exact MiniCPM4 shapes; peak: " + (
                           "torch.cuda.max_memory_allocated" if a.device == "cuda" else
                           "peak RSS above the idle process (after imports, before the model), each configuration "
                           "in its own process") + "; step time: median of the steps after the first")
    else:
        print("\n".join(lines))
    return 0 if all("error" not in r for r in rows) else 1


def table(rows: list[dict]) -> list[str]:
    lines = ["| shape | tokens | mode | grad ckpt | bytes/param (W+G+opt) | state GB | peak GB | step s | tokens/s "
             "| vs fp: step, peak |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['batch']} | {r['mode']} | {r['gradient_checkpointing']} | "
                         f"failed: {r['error'][:120]} |||||")
            continue
        fp = next((x for x in rows if x.get("mode") == "fp" and x["shape"] == r["shape"] and x["batch"] == r["batch"]
                   and "error" not in x and x["gradient_checkpointing"] == r["gradient_checkpointing"]), None)
        rel = (f"{r['step_seconds'] / fp['step_seconds']:.2f}×, {r['peak_gb'] / fp['peak_gb']:.2f}×"
               if fp and r["mode"] != "fp" else "")
        mode = r["mode"] + (f" ({r['quantizer']})" if r.get("quantizer") not in (None, "-") else "")
        lines.append(f"| {r['shape']} ({r['parameters'] / 1e6:.0f}M) | {r['batch']} | {mode} | "
                     f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['bytes_per_parameter']} | {r['state_gb']} | "
                     f"{r['peak_gb']} | {r['step_seconds']} | {r['tokens_per_second']} | {rel} |")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
