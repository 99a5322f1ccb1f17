"""``paretoq train`` (``python train_variants.py train ...`` under torchrun) with test-only changes, chosen by
environment variables, for tests/training/test_distributed.py:

- ``PARETOQ_TEST_SLOW_RANK=1``: rank 1 writes its part of every checkpoint (its RNG state file) 2 s late, so a
  checkpoint moved into place before every process had written its part would miss it;
- ``PARETOQ_TEST_NO_SAVE_BARRIER=1`` (negative control): the processes do not wait for each other while a
  checkpoint is written and moved into place;
- ``PARETOQ_TEST_GRAD_SUM=1`` (negative control): DDP sums the gradients across ranks instead of averaging them.
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from paretoq.cli import main
from paretoq.training.trainer import QATTrainer

if os.environ.get("PARETOQ_TEST_SLOW_RANK") == "1":
    save_rng_state = QATTrainer._save_rng_state

    def late_on_rank_1(self, output_dir):
        if self.args.process_index == 1:
            time.sleep(2)
        return save_rng_state(self, output_dir)

    QATTrainer._save_rng_state = late_on_rank_1

if os.environ.get("PARETOQ_TEST_NO_SAVE_BARRIER") == "1":
    save_checkpoint = QATTrainer._save_checkpoint

    def without_barriers(self, model, trial):
        accelerator = type(self.accelerator)
        barrier = accelerator.wait_for_everyone
        accelerator.wait_for_everyone = lambda _self: None
        try:
            return save_checkpoint(self, model, trial)
        finally:
            accelerator.wait_for_everyone = barrier

    QATTrainer._save_checkpoint = without_barriers

if os.environ.get("PARETOQ_TEST_GRAD_SUM") == "1":
    ddp_init = DistributedDataParallel.__init__

    def allreduce_sum(state, bucket):  # DDP's default hook divides by the world size first
        return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])

    def summing_ddp(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        self.register_comm_hook(None, allreduce_sum)

    DistributedDataParallel.__init__ = summing_ddp

sys.exit(main(sys.argv[1:]))
