"""One QAT run: load → quantize → train with the Trainer → evaluate → save. Used by ``paretoq
train``, ``paretoq sweep`` and ``paretoq demo``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerState, default_data_collator, set_seed

from paretoq.data import build_datasets
from paretoq.errors import UserError
from paretoq.quant import fused
from paretoq.quant.config import QuantConfig
from paretoq.quant.linear import QuantLinear
from paretoq.training.args import TrainConfig
from paretoq.training.checkpointing import (COMPLETION_MARKER, check_checkpoint_files, latest_complete_checkpoint, publish_model,
                                            remove_leftovers)
from paretoq.training.preflight import check_model_folder, check_output_dir, held_logs
from paretoq.eval.perplexity import perplexity_from_loss
from paretoq.training.callbacks import LogLastStepCallback, LossPlotCallback
from paretoq.training.recipe import prepare_model, trainer_kwargs
from paretoq.training.lean import import_optimizer_states, to_lean
from paretoq.training.sharding import connect_deepspeed
from paretoq.training.trainer import QATTrainer

logger = logging.getLogger(__name__)


def _load_model(cfg: TrainConfig):
    from paretoq.loading import load_model

    # fp32 master weights whatever the checkpoint's dtype (lean mode casts them to bf16 after the
    # scales are initialised from them); --bf16 means bf16 autocast compute.
    return load_model(cfg.model.input_model_filename, dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code)


def prepare_output_dir(path: str) -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"--output_dir {path} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".paretoq-write-test-"):
            pass
    except OSError as e:
        raise UserError(f"--output_dir {path} is not writable ({e.strerror})") from None


def find_resume_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint to continue from: --resume_from_checkpoint, else the latest complete one in
    output_dir (a checkpoint-N without trainer_state.json is skipped; ``.tmp-*`` leftovers of an
    interrupted save are deleted)."""
    explicit = cfg.training.resume_from_checkpoint
    if explicit:
        if not os.path.isdir(explicit):
            raise UserError(f"--resume_from_checkpoint {explicit}: no such checkpoint folder")
        return explicit
    if cfg.training.should_save:
        remove_leftovers(cfg.training.output_dir)
    last = latest_complete_checkpoint(cfg.training.output_dir)
    if cfg.run.resume and last is None:
        raise UserError(f"--resume: no checkpoint-* folder in {cfg.training.output_dir} to continue from")
    return last


def check_checkpoint_matches(checkpoint: str, cfg: TrainConfig) -> None:
    """Refuse to resume a checkpoint written with another w_bits / group_size."""
    cfg_path = Path(checkpoint) / "config.json"
    try:
        saved = json.loads(cfg_path.read_text()).get("quantization_config") or {}
    except (OSError, json.JSONDecodeError):
        raise UserError(f"checkpoint {checkpoint} has no readable config.json; delete it or pick another") from None
    if not saved and cfg.model.qat_start_fraction > 0:
        return  # written during the full-precision phase before QAT starts (training/recipe.py)
    try:
        have = QuantConfig.from_dict(saved) if saved else QuantConfig()
    except UserError as e:
        raise UserError(f"checkpoint {checkpoint}: {e}") from None
    if not have.same_layers(cfg.quant):
        raise UserError(
            f"checkpoint {checkpoint} was trained with {have.describe()}, but this run asks for "
            f"{cfg.quant.describe()}: use another --output_dir or the same quantization flags")


def checkpoint_progress(checkpoint: str, cfg: TrainConfig) -> tuple[int, int]:
    """(the checkpoint's step, the step this run ends at): ``--max_steps``, else the checkpoint's own plan."""
    try:
        state = json.loads((Path(checkpoint) / COMPLETION_MARKER).read_text())
        step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    except (OSError, ValueError, TypeError):
        raise UserError(f"checkpoint {checkpoint} has no readable {COMPLETION_MARKER}; delete it or pick another") \
            from None
    return step, cfg.training.max_steps if cfg.training.max_steps > 0 else planned


def finished_results(cfg: TrainConfig) -> dict | None:
    """The results of this run if it has already finished (final model and results on disk), else None."""
    final = Path(cfg.final_model_dir)
    results = Path(cfg.training.output_dir) / "all_results.json"
    if not ((final / "config.json").is_file() and any(final.glob("model*.safetensors")) and results.is_file()):
        return None
    try:
        return json.loads(results.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def _removed_on_user_error(path: str, created: bool):
    """Delete ``path`` (a folder this run created) if a ``UserError`` stops the run before training."""
    try:
        yield
    except UserError:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise


def run_training(cfg: TrainConfig, callbacks=()) -> dict:
    """Train, evaluate and save; returns the final metrics (incl. eval perplexity)."""
    args = cfg.training
    if args.process_index == 0:
        for note in cfg.seed_flag_notes():
            logger.info("%s", note)
    # Cheap checks first (nothing written, no weights read), then the data (every line is checked
    # while it is tokenised), then the weights: a user's mistake ends in one line and no output.
    if args.should_save:
        check_output_dir(args.output_dir)
    resume = find_resume_checkpoint(cfg)
    complete = False
    if resume:
        check_checkpoint_matches(resume, cfg)
        step, last = checkpoint_progress(resume, cfg)
        complete = step >= last
        finished = finished_results(cfg) if complete else None
        if finished is not None:  # a re-run of a finished run changes nothing
            logger.info("%s: training is already complete (step %d of %d, %s); nothing to do (a larger "
                        "--max_steps trains further)", args.output_dir, step, last, os.path.basename(resume))
            return {**finished, "final_model_dir": cfg.final_model_dir, "already_complete": True}
        import_optimizer_states(args.optim)  # torchao's low-bit states load with weights_only=True once imported
        check_checkpoint_files(resume)  # safetensors weights; Trainer state files hold only tensors
        logger.info("resuming from %s (step %d of %d)%s", resume, step, last,
                    ": training is complete there, writing the final model" if complete else "")
    check_model_folder(cfg.model.input_model_filename, cfg.quant, cfg.model.trust_remote_code)
    lean_mode = cfg.run.master_weights == "bf16"
    # the model's, not a global switch; the fused kernels read fp32 weights: lean mode runs the eager math
    kernels = "fused" if cfg.fused_quantizer and cfg.quant.enabled and not lean_mode else "eager"
    if kernels == "fused" and (args.use_cpu or not torch.cuda.is_available()):
        # the CPU kernels, built (once per machine, in child processes) before the model takes memory
        kernels = fused.prebuild(cfg.quant.schemes(), torch.bfloat16 if args.bf16 else torch.float16 if args.fp16
                                 else torch.float32) or "eager"  # (None: not buildable, warned)
    with _removed_on_user_error(args.output_dir, created=not os.path.exists(args.output_dir) and args.should_save):
        from paretoq.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model.input_model_filename, trust_remote_code=cfg.model.trust_remote_code)
        with held_logs(), args.main_process_first(desc="tokenising"):  # logs shown once both files are read
            train_ds, eval_ds = build_datasets(
                tokenizer, cfg.data.train_data_local_path, cfg.data.eval_data_local_path,
                block_size=cfg.data.model_max_length,
                cache_dir=cfg.data.cache_dir or os.path.join(args.output_dir, ".cache"),
                eval_fraction=cfg.data.eval_fraction)
        prepare_output_dir(args.output_dir)
        os.environ["TENSORBOARD_LOGGING_DIR"] = cfg.run.logging_dir or os.path.join(args.output_dir, "logs")
        set_seed(args.seed)
        connect_deepspeed(args)
        model = _load_model(cfg)
        report, teacher, calibration = prepare_model(model, cfg, train_ds.blocks, resume)  # quantize (logs it)
        if lean_mode:
            to_lean(model)
            logger.info("lean mode: bf16 weights and gradients, fp32 scales, --optim %s with stochastic rounding",
                        getattr(args.optim, "value", args.optim))
    if args.should_save:
        cfg.save(args.output_dir)

    trainer = QATTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, data_collator=default_data_collator,
                         callbacks=[LogLastStepCallback(), LossPlotCallback(), *callbacks], quantizer_kernels=kernels,
                         loss_chunk_size=cfg.loss_chunk_size, **trainer_kwargs(cfg, teacher, calibration))
    start = time.perf_counter()
    logger.info("quantizer: %s", "eager" if kernels == "eager" else "fused kernels")
    if complete:  # the last checkpoint is the end of training: its weights, no further step
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, COMPLETION_MARKER))
        metrics = {"train_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history)
                                       if "train_loss" in h), float("nan"))}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    metrics["train_wall_seconds"] = round(time.perf_counter() - start, 2)
    metrics["train_samples"] = len(train_ds)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)

    eval_metrics = trainer.evaluate()
    eval_metrics["perplexity"] = perplexity_from_loss(eval_metrics["eval_loss"])
    eval_metrics["eval_samples"] = len(eval_ds)
    trainer.log_metrics("eval", eval_metrics)
    trainer.save_metrics("eval", eval_metrics)
    trainer.save_state()

    final_dir = cfg.final_model_dir
    publish_model(trainer, tokenizer, final_dir)  # files moved in complete, config.json last
    if args.should_save:
        what = f"{cfg.quant.summary()} fake-quant model" if cfg.quant.enabled else "model (not quantized)"
        logger.info("final %s: %s", what, final_dir)
    return {**metrics, **eval_metrics, "final_model_dir": final_dir, "quantized_layers": sum(isinstance(m, QuantLinear) for m in model.modules())}
