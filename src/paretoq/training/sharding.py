"""Quantizing a model whose weights DeepSpeed ZeRO-3 has already partitioned.

With ``--deepspeed`` and a stage-3 config, ``TrainingArguments`` switches transformers'
``from_pretrained`` to ``deepspeed.zero.Init``: every loaded Parameter is a 0-element placeholder
whose values live in slices across the ranks. ``quantize_model`` needs the whole weight (scale
init reads every row; ``--scale_init gptq`` rewrites the latent weight; calibration runs the
model), so ``full_weights`` gathers the parameters for the duration of the swap. Rank 0's result is
what every rank keeps (``modifier_rank=0``; all ranks compute the same thing from the same weights
and calibration blocks). The new ``weight_clip_val`` Parameters are ordinary tensors; DeepSpeed
partitions them like the rest when the Trainer builds its engine, and consolidates them on save
(``stage3_gather_16bit_weights_on_model_save`` in ``configs/deepspeed_zero3.json``).

Without ZeRO-3 (single process, DDP, ZeRO-1/2, FSDP — which wraps the model only inside the
Trainer, after the swap) this is a no-op.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager

import torch

from torch import nn


def zero3_enabled() -> bool:
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())


@contextmanager
def full_weights(model: nn.Module):
    """Every parameter of ``model`` whole inside the block (ZeRO-3), untouched otherwise."""
    if not zero3_enabled():
        yield
        return
    import deepspeed

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def connect_deepspeed(args) -> None:
    """Give DeepSpeed a process group before the model is loaded (ZeRO-3 partitions while loading).

    Under torchrun on GPUs accelerate calls ``deepspeed.init_distributed`` itself; on CPU it sets the
    run up as plain multi-CPU and never does, so DeepSpeed would see a world of 1 and reject the
    batch arithmetic (``train_batch_size != micro_batch * grad_acc * world_size``); here DeepSpeed
    adopts the group torchrun made. Started without a launcher (``python -m paretoq train
    --deepspeed ...``) the run is a world of one on this machine. Idempotent.
    """
    if not args.deepspeed:
        return
    args.device  # noqa: B018 -- sets up torchrun's process group (TrainingArguments._setup_devices)
    import deepspeed
    import deepspeed.comm as ds_dist
    import torch.distributed as torch_dist

    if ds_dist.is_initialized():
        return
    if torch_dist.is_available() and torch_dist.is_initialized():
        backend = torch_dist.get_backend()
    else:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(_free_port()))):
            os.environ.setdefault(key, value)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
