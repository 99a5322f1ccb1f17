"""`QATTrainer`: transformers' Trainer plus what QAT needs. Every override is in this file.

| override | what it adds | helpers |
|---|---|---|
| ``create_optimizer`` | the scales (``weight_clip_val``) in their own group: no weight decay, LR × ``scale_lr_multiplier``; the group exists (empty) from step 0 when QAT starts later | |
| ``create_scheduler`` | with an FP phase (``qat_start_fraction``) or a default WSD decay: the schedule restarts with a fresh warm-up when QAT starts | ``recipe.py`` |
| ``compute_loss`` | distillation from the FP model: (1 − w)·CE + w·T²·KL | ``distill.py`` |
| ``__init__`` | the quantizer kernels of the model's layers (``quantizer_kernels``) and the fake-quant cache | ``quant/fused.py``, ``quant/linear.py`` |
| ``compute_loss``, ``prediction_step`` | (also) the causal-LM loss over chunks of positions, never the whole sequence's logits at once (training, and evaluation of the loss alone) | ``chunked_loss.py`` |
| ``create_optimizer`` | (also) bf16 weights (lean mode) get torchao's stochastic rounding | ``lean.py`` |
| ``training_step`` | a nan/inf loss stops the run before the optimizer step; the fake-quant cache's gradients are pushed through the quantizer after the step's last micro-batch; tokens counted | ``guards.py``, ``quant/linear.py`` |
| ``log`` | ``tokens_per_second`` and ``peak_memory_gb`` in every training log line | ``lean.py`` |
| ``_save_checkpoint``, ``_get_output_dir`` | checkpoints are written into ``.tmp-checkpoint-N`` and moved into place complete; weights with nan/inf are never saved | ``checkpointing.py`` |
| ``save_state``, ``save_metrics`` | ``trainer_state.json`` and the results files are replaced atomically | ``paretoq/files.py`` |
| ``_load_from_checkpoint`` | resuming a LongRoPE model (MiniCPM4) | |

The fake-quant cache (Ŵ once per optimizer step) is on in single-process runs with gradient
accumulation or checkpointing; DDP/FSDP/DeepSpeed need ∂L/∂W during backward, so not there; nor
in lean mode (bf16 weights), where memory comes first: it holds Ŵ for the whole step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer

from paretoq.files import TMP_PREFIX, atomic_file, atomic_write, fsync_tree, replace_folder
from paretoq.quant.fused import set_kernels
from paretoq.quant.linear import SCALE_PARAM, flush_fake_quant_grads, set_fake_quant_cache
from paretoq.training import guards
from paretoq.training import chunked_loss, lean
from paretoq.training.checkpointing import COMPLETION_MARKER
from paretoq.training.distill import distillation_kl
from paretoq.training.recipe import SCALE_GROUP, QATStartCallback, is_wsd, qat_start_step, two_phase_lambda

logger = logging.getLogger(__name__)


class QATTrainer(Trainer):
    """``Trainer`` for QAT; the keyword arguments below come on top of the Trainer's own.

    Args:
        scale_lr_multiplier: LR of the scales = LR × this.
        fake_quant_cache: allow the fake-quant cache where it saves work (see the module docstring).
        quantizer_kernels: "eager", "fused", "auto" or a ``FusedKernels`` (``paretoq.quant.fused``) for the
            model's quantized layers and those a mid-run QAT start creates; None: the layers keep theirs.
        quant_config, qat_start_fraction, calibration_data: a full-precision phase first: the model
            is quantized in place (``quant_config``) after ``qat_start_fraction`` of the steps.
        teacher, kd_weight, kd_temperature: distillation from ``teacher`` (``distill.make_teacher``).
        loss_chunk_size: positions per chunk of the causal-LM loss (``chunked_loss.py``); 0 = the model's
            plain loss; None = chunks of 1024 where one micro-batch's fp32 logits would take more than
            ``CHUNKED_LOSS_ABOVE`` bytes.
    """

    CHUNKED_LOSS_ABOVE = 256 * 2**20

    def __init__(self, *args, scale_lr_multiplier: float = 1.0, fake_quant_cache: bool = True,
                 quantizer_kernels=None, quant_config=None, qat_start_fraction: float = 0.0, calibration_data=None,
                 teacher: nn.Module | None = None, kd_weight: float = 0.0, kd_temperature: float = 1.0,
                 loss_chunk_size: int | None = None, **kwargs):
        if not 0.0 <= kd_weight <= 1.0:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        if kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive, got {kd_temperature}")
        if kd_weight > 0 and teacher is None:
            raise ValueError("kd_weight > 0 needs a teacher model (make_teacher(model) before quantize_model)")
        self.scale_lr_multiplier = scale_lr_multiplier
        self.quantizer_kernels = quantizer_kernels
        self.qat_start_fraction = qat_start_fraction
        self.kd_weight, self.kd_temperature = kd_weight, kd_temperature
        self.teacher = teacher if kd_weight > 0 else None
        self._nonfinite_loss: torch.Tensor | None = None
        self._staging_root: str | None = None
        self.loss_chunk_size = loss_chunk_size
        self._tokens, self._clock = 0, None  # tokens trained on since the last log line, and since when
        super().__init__(*args, **kwargs)
        if self.teacher is not None:
            self.teacher.to(self.args.device)
        single = self.accelerator.num_processes == 1 and self.args.n_gpu <= 1 \
            and not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        self.fake_quant_cache = fake_quant_cache and single \
            and (self.args.gradient_accumulation_steps > 1 or bool(self.args.gradient_checkpointing)) \
            and not lean.is_lean(self.model)
        set_fake_quant_cache(self.model, self.fake_quant_cache)
        if quantizer_kernels is not None:
            set_kernels(self.model, quantizer_kernels)
        self.qat_start = None
        if qat_start_fraction > 0:
            if quant_config is None or not quant_config.enabled:
                raise ValueError("qat_start_fraction > 0 needs a quantizing quant_config")
            if not single:
                raise ValueError("qat_start_fraction > 0 works in single-process runs only (DDP/FSDP/DeepSpeed wrap "
                                 "the model before QAT would start): use qat_start_fraction 0")
            self.qat_start = QATStartCallback(quant_config, qat_start_fraction, calibration_data,
                                              after_switch=self._after_switch)
            self.add_callback(self.qat_start)

    def _after_switch(self, model) -> None:
        """The layers a mid-run QAT start creates get the run's fake-quant cache and quantizer kernels."""
        set_fake_quant_cache(model, self.fake_quant_cache)
        if self.quantizer_kernels is not None:
            set_kernels(model, self.quantizer_kernels)

    # -- optimizer and schedule ----------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = {"decay": [], "no_decay": [], "scales": []}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                groups["scales" if name.endswith(SCALE_PARAM) else "decay" if name in decay else "no_decay"].append(p)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if lean.SR_OPTION in optimizer_kwargs and lean.SR_OPTION not in (self.args.optim_args or "") \
                and lean.is_lean(opt_model):
            optimizer_kwargs[lean.SR_OPTION] = True  # bf16 weights: updates rounded stochastically (lean.py)
        lr = optimizer_kwargs.get("lr", self.args.learning_rate)
        param_groups = [
            {"params": groups["decay"], "weight_decay": self.args.weight_decay},
            {"params": groups["no_decay"], "weight_decay": 0.0},
        ]
        if groups["scales"] or self.qat_start is not None:  # empty until QAT starts: the scheduler knows its LR
            param_groups.append({"params": groups["scales"], "weight_decay": 0.0, "lr": lr * self.scale_lr_multiplier,
                                 SCALE_GROUP: True})
        self.optimizer = optimizer_cls([g for g in param_groups if g["params"] or g.get(SCALE_GROUP)],
                                       **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        switch = qat_start_step(self.qat_start_fraction, num_training_steps)
        kwargs = self.args.lr_scheduler_kwargs or {}
        if switch == 0 and not (is_wsd(self.args.lr_scheduler_type) and "num_decay_steps" not in kwargs):
            return super().create_scheduler(num_training_steps, optimizer)  # transformers' schedule, untouched
        try:
            lr_lambda = two_phase_lambda(self.args, num_training_steps, switch)
        except AttributeError:  # a scheduler that is not a LambdaLR (e.g. reduce_lr_on_plateau)
            raise ValueError(f"lr_scheduler_type {self.args.lr_scheduler_type} cannot restart at the QAT start: use "
                             "cosine, linear, constant_with_warmup, warmup_stable_decay, ...") from None
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # -- loss and step -------------------------------------------------------------------------
    def _chunk_size(self, model, inputs) -> int:
        """Positions per chunk of the loss for this batch; 0 = the model's plain loss."""
        if self.loss_chunk_size == 0 or self.teacher is not None or "labels" not in inputs \
                or self.accelerator.num_processes > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled \
                or not chunked_loss.eligible(model):
            return 0
        if self.loss_chunk_size is not None:
            return self.loss_chunk_size
        logits_bytes = inputs["labels"].numel() * model.get_output_embeddings().out_features * 4
        return chunked_loss.DEFAULT_CHUNK if logits_bytes > self.CHUNKED_LOSS_ABOVE else 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chunk = self._chunk_size(model, inputs) if model.training and not return_outputs else 0
        if chunk:
            hidden, head = chunked_loss.hidden_states_and_head(model, inputs)
            return chunked_loss.chunked_causal_lm_loss(hidden, head, inputs["labels"], num_items_in_batch, chunk)
        if self.teacher is None or not model.training or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        ce, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        kl_sum, count = distillation_kl(outputs.logits, self._teacher_logits(inputs), inputs["labels"],
                                        self.kd_temperature)
        if num_items_in_batch is not None:
            # the Trainer's normalisation of the CE part: Σ / tokens of the accumulated batch, times
            # the number of processes when tokens are averaged across devices (see Trainer.compute_loss)
            kl = kl_sum / num_items_in_batch
            if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs:
                kl = kl * (self.accelerator.num_processes // self.get_tp_size())
        else:
            kl = kl_sum / max(count, 1)
        w, temp = self.kd_weight, self.kd_temperature
        loss = (1.0 - w) * ce + w * temp * temp * kl.to(ce.dtype)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss in chunks too where only the loss is asked for (no logits kept)."""
        chunk = self._chunk_size(model, inputs) if prediction_loss_only else 0
        if not chunk:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            hidden, head = chunked_loss.hidden_states_and_head(model, inputs)
            loss = chunked_loss.chunked_causal_lm_loss(hidden, head, inputs["labels"], None, chunk)
        return loss.detach(), None, None

    def _teacher_logits(self, inputs: dict) -> torch.Tensor:
        feed = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        amp = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        with torch.no_grad(), torch.autocast(device_type=self.args.device.type, dtype=amp or torch.float32,
                                             enabled=amp is not None):
            return self.teacher(**feed, use_cache=False).logits

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._clock is None:
            self._clock = time.perf_counter()
        ids = inputs.get("input_ids")
        self._tokens += ids.numel() if ids is not None else 0
        loss = super().training_step(model, inputs, num_items_in_batch)
        detached = loss.detach()
        if self._nonfinite_loss is None and not torch.isfinite(detached).all():
            self._nonfinite_loss = detached.float().cpu()
        if self.accelerator.sync_gradients or self.accelerator.num_processes <= 1:
            # once per optimizer step (after its last micro-batch), before the optimizer runs
            bad = self._nonfinite_loss is not None
            if guards.agreed(self.accelerator, bad, self.args.device):
                value = "nan" if bad and torch.isnan(self._nonfinite_loss).any() else "inf" if bad else "non-finite"
                self._nonfinite_loss = None
                guards.diverged(f"the training loss is {value} at step {self.state.global_step + 1}",
                                self.args.output_dir)
        if self.fake_quant_cache and self.accelerator.sync_gradients:
            flush_fake_quant_grads(model)  # before gradient clipping and the optimizer step
        return loss

    def _pause_clock(self, began: float) -> None:
        """Leave the time since ``began`` (a checkpoint, an evaluation) out of ``tokens_per_second``."""
        if self._clock is not None:
            self._clock += time.perf_counter() - began

    def evaluate(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self._pause_clock(began)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Training log lines (those with ``loss``) get ``tokens_per_second`` (all processes, since the
        previous line) and ``peak_memory_gb`` (this process: CUDA max allocated, else peak RSS; 1e9 bytes)."""
        if "loss" in logs and self._clock is not None:
            now = time.perf_counter()
            if now > self._clock and self._tokens:
                logs["tokens_per_second"] = round(self._tokens * self.accelerator.num_processes / (now - self._clock), 1)
            logs["peak_memory_gb"] = round(lean.peak_memory_bytes(self.args.device) / 1e9, 3)
            self._tokens, self._clock = 0, now
        super().log(logs, start_time)

    # -- checkpoints and result files ----------------------------------------------------------
    def _get_output_dir(self, trial):
        # while a checkpoint is being written, the Trainer's "run folder" is its staging folder
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        if guards.agreed(self.accelerator, guards.any_nonfinite(p.detach() for p in self.model.parameters()),
                         self.args.device):
            guards.diverged(f"the weights contain nan/inf after step {self.state.global_step}", self.args.output_dir)
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, f"{TMP_PREFIX}{name}")
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_root = staging_root
        began = time.perf_counter()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
            self._pause_clock(began)
        best = self.state.best_model_checkpoint
        if best is not None and os.path.normpath(best) == os.path.normpath(staged):
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, COMPLETION_MARKER))
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            fsync_tree(staged)
            replace_folder(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_state(self):
        if self.is_world_process_zero():
            with atomic_file(os.path.join(self.args.output_dir, COMPLETION_MARKER)) as tmp:
                self.state.save_to_json(tmp)

    def save_metrics(self, split, metrics, combined=True):
        """``<split>_results.json`` (and ``all_results.json`` updated), each replaced atomically."""
        if not self.is_world_process_zero():
            return
        out = Path(self.args.output_dir)
        atomic_write(out / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
        if combined:
            all_path = out / "all_results.json"
            try:
                merged = json.loads(all_path.read_text(encoding="utf-8")) if all_path.is_file() else {}
            except (OSError, ValueError):
                merged = {}
            merged.update(metrics)
            atomic_write(all_path, json.dumps(merged, indent=4, sort_keys=True))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # transformers 5.x (Trainer._load_from_checkpoint) reads the checkpoint's config.json with the
        # generic ``PreTrainedConfig`` only to compare transformers versions, and for a LongRoPE
        # ``rope_scaling`` (MiniCPM4, Phi-3) that generic class fails its RoPE validation. For that one
        # call the module's name points at the model's own config class; other majors are left alone.
        import transformers.trainer as hf_trainer

        generic = getattr(hf_trainer, "PreTrainedConfig", None)
        if generic is None or Version(transformers.__version__).major != 5:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        hf_trainer.PreTrainedConfig = type(self.model.config)
        try:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        finally:
            hf_trainer.PreTrainedConfig = generic
