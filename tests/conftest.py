"""Shared test helpers: where the project's fixtures live, small model builders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # what they are and how they were made: their README.md files
FIXTURE = FIXTURES / "minicpm4-tiny"
TEXT = FIXTURES / "text"

# The MiniCPM4 fixture against the official code (fixtures/minicpm4-tiny/README.md): 4× the largest error
# measured on CPU (torch 2.13, fp32, eager and sdpa, full precision and all five bit widths), rounded up.
# Measured: logits 3.7–6.6e-7 (absolute), loss 0–4.8e-7, gradients ≤ 1.27e-6 of their max magnitude.
# RMSNorm's ε 1e-5 instead of 1e-6 measures logits 1.1–2.3e-5 and gradients 5.4–8.7e-5 and must fail
# (tests/models/test_minicpm.py::test_wrong_rms_norm_eps_fails_the_official_comparison).
LOGITS_ATOL, LOSS_ATOL, GRAD_RTOL = 3e-6, 2e-6, 6e-6
MINICPM_BITS = {"w0": 1.58, "w1": 1, "w2": 2, "w3": 3, "w4": 4}  # the reference's w_bits=0 is ternary
MINICPM_PROBES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")

torch.set_num_threads(min(2, torch.get_num_threads()))

# `paretoq train` runs the quantizer's fused kernels on CPU by default (--compile_quantizer auto),
# built ahead of time once per machine. The suite trains with the eager quantizer unless told
# otherwise (PARETOQ_COMPILE_QUANTIZER=auto|true runs it all fused); the fused path and the auto
# default have tests of their own (tests/quant/test_fused.py, tests/training/test_recipe.py).
os.environ.setdefault("PARETOQ_COMPILE_QUANTIZER", "false")


@pytest.fixture(scope="session")
def prebuilt_kernels():
    """The CPU kernels (``paretoq.quant.fused``) the quantizer tests call, built up front in parallel
    child processes (minutes on a machine that never built them, then read from the disk cache):
    every scheme's forward and short-row backward, fp32 and bf16. Returns their keys."""
    from paretoq.quant.fused import FusedKernels
    from paretoq.quant.functional import SCHEMES

    keys = [(name, scheme, dtype, None if name == "forward" else False) for scheme in SCHEMES.values()
            for dtype in (torch.float32, torch.bfloat16) for name in ("forward", "backward")]
    FusedKernels().load(keys)
    return keys


@pytest.fixture
def fused(prebuilt_kernels):
    """A fresh ``FusedKernels`` (CPU: the kernels built ahead of time, already loaded in this process)
    to pass as ``kernels=`` or to ``set_kernels``; its ``calls`` start at zero."""
    from paretoq.quant.fused import FusedKernels

    return FusedKernels()


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def ref() -> dict[str, torch.Tensor]:
    """The official MiniCPM4 code's outputs on the fixture (keys: fixtures/minicpm4-tiny/README.md)."""
    from safetensors.torch import load_file

    return load_file(str(FIXTURE / "reference.safetensors"))


def train_argv(out, *extra, bits=2, steps=4, **flags) -> list[str]:
    """The arguments (after ``paretoq train``) of a tiny run on the fixture model and text: ``flags``
    replace or add ``--name value`` pairs (``name=None`` drops one), ``extra`` is appended as given."""
    base = {"input_model_filename": FIXTURE, "train_data_local_path": TEXT / "kjv_train.jsonl",
            "eval_data_local_path": TEXT / "kjv_eval.jsonl", "w_bits": bits, "output_dir": out,
            "model_max_length": 32, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 8,
            "max_steps": steps, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3, "seed": 11,
            "dataloader_num_workers": 0, "report_to": "none", "disable_tqdm": "true"}
    argv = []
    for key, value in {**base, **flags}.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv + [str(a) for a in extra]


def stop_at(step: int):
    """A Trainer callback that ends training after ``step`` (a run "killed" after that step's checkpoint)."""
    from transformers import TrainerCallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= step:
                control.should_training_stop = True

    return StopAt()


def tiny_llama(layers: int = 2, hidden: int = 64, vocab: int = 128, seed: int = 0):
    """A tiny random LlamaForCausalLM built in code (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def assert_quantized_minicpm_matches_official(model, ref, tag, logits_atol=LOGITS_ATOL, loss_atol=LOSS_ATOL,
                                              grad_rtol=GRAD_RTOL):
    """``model``, the MiniCPM4 fixture quantized at ``MINICPM_BITS[tag]`` on any device, meets the
    official code's scale init, logits and loss on the short input, and the probed layers' gradients."""
    layers = {name: model.get_submodule(name) for name in MINICPM_PROBES}
    for name, layer in layers.items():
        key = name.replace(".", "_")
        torch.testing.assert_close(layer.weight_clip_val.detach().cpu(), ref[f"scale_init_{tag}_{key}"], atol=0,
                                   rtol=1e-6)
    ids = ref["input_ids_short"].to(model.device)
    out = model(ids, labels=ids, use_cache=False)
    torch.testing.assert_close(out.logits.detach().cpu(), ref[f"logits_{tag}"], atol=logits_atol, rtol=0)
    torch.testing.assert_close(out.loss.detach().cpu().reshape(1), ref[f"loss_{tag}"], atol=loss_atol, rtol=0)
    out.loss.backward()
    for name, layer in layers.items():
        key = name.replace(".", "_")
        for what, got in (("weight", layer.weight.grad), ("scale", layer.weight_clip_val.grad)):
            expected = ref[f"grad_{what}_{tag}_{key}"]
            err = float((got.cpu() - expected).abs().max() / expected.abs().max())
            assert err <= grad_rtol, f"{tag} {name} {what} grad: max error / max |ref| = {err:.3g} > {grad_rtol}"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where a CUDA device is; elsewhere they are reported as skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
