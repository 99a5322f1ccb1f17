"""How closely an engine runs an export: its next-token distributions against paretoq's fake-quant model.

``paretoq export ... --check TEXT.jsonl`` (or :func:`check_export`) tokenizes held-out text, cuts it into windows,
and at every position compares the distribution the engine computes from the exported file with the one
paretoq's model (the folder exported, fake-quant or packed, in fp32) computes: the mean KL divergence
KL(paretoq ‖ engine) in nats, the top-1 agreement (how often both pick the same next token) and the perplexity of
each on the text (exp of the mean next-token cross-entropy within the windows): with an engine that rounds
activations (llama.cpp) position-by-position agreement has a ceiling, while the perplexities show whether the
engine keeps the model's quality (docs/deploy.md). The engines:
llama.cpp (llama-cpp-python, all logits) for GGUF, plain transformers for the hf and compressed-tensors folders,
paretoq's loader for packed folders. Both sides see the same token ids.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from paretoq.errors import UserError

logger = logging.getLogger(__name__)

ENGINES = {"gguf": "llama.cpp", "hf": "transformers", "compressed-tensors": "transformers (compressed-tensors)",
           "packed": "paretoq (packed)"}


@dataclass
class AgreementReport:
    """Agreement of an engine with paretoq over ``tokens`` positions of ``source``."""

    engine: str
    source: str
    tokens: int
    top1: float  # fraction of positions where both argmaxes agree
    mean_kl: float  # nats, KL(paretoq ‖ engine), averaged over positions
    max_abs_logit_diff: float
    ppl_reference: float  # paretoq's perplexity on the scored positions
    ppl_engine: float  # the engine's

    def line(self) -> str:
        return (f"check: {self.engine} vs paretoq's fake-quant model on {self.tokens} tokens of {self.source}: "
                f"top-1 agreement {100 * self.top1:.2f}%, mean KL {self.mean_kl:.3g} nats, "
                f"max |Δlogit| {self.max_abs_logit_diff:.3g}, perplexity {self.ppl_engine:.4g} vs paretoq's "
                f"{self.ppl_reference:.4g}")


def agreement(reference: torch.Tensor, engine: torch.Tensor) -> tuple[float, float, float, int]:
    """(top-1 agreement, mean KL(ref ‖ engine), max |Δlogit|, positions) of two (positions, vocab) logit tensors."""
    ref, eng = reference.double(), engine.double()
    if ref.shape != eng.shape:
        raise UserError(f"check: the engine returned logits of shape {tuple(eng.shape)}, paretoq {tuple(ref.shape)}")
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(eng, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    top1 = (ref.argmax(-1) == eng.argmax(-1)).double()
    return float(top1.mean()), float(kl.mean()), float((ref - eng).abs().max()), ref.shape[0]


def window_perplexity(logits: torch.Tensor, windows: list[list[int]]) -> float:
    """exp(mean next-token cross-entropy) of logits (the windows' positions, concatenated) over each window's own
    next tokens (a window's last position predicts nothing here)."""
    import torch.nn.functional as F

    total, n, start = 0.0, 0, 0
    for ids in windows:
        scores = logits[start:start + len(ids)].double()
        start += len(ids)
        if len(ids) > 1:
            total += F.cross_entropy(scores[:-1], torch.tensor(ids[1:]), reduction="sum").item()
            n += len(ids) - 1
    return math.exp(total / max(n, 1))


def token_windows(text_path: str | os.PathLike, tokenizer, tokens: int, window: int) -> list[list[int]]:
    """Windows of ≤ ``window`` token ids from the documents of ``text_path`` (joined by blank lines), ``tokens``
    ids in all; ``UserError`` if the text has fewer than 2."""
    from paretoq.data import read_texts

    if tokens < 1:
        raise UserError(f"--check_tokens must be positive, got {tokens}")
    ids: list[int] = []
    for text in read_texts(text_path):
        ids.extend(tokenizer(text + "\n\n").input_ids)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    if len(ids) < 2:
        raise UserError(f"check: {text_path} has {len(ids)} token(s); it needs at least 2")
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 1]


def _llama_cpp_logits(path: Path, windows: list[list[int]], n_ctx: int, threads: int | None,
                      kv_f32: bool = False) -> list[torch.Tensor]:
    """llama.cpp's logits of every window (``kv_f32``: an fp32 KV cache instead of llama.cpp's default f16)."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("check of a GGUF export needs llama-cpp-python: pip install 'paretoq[llamacpp]' "
                        "(or make install-llamacpp)") from None
    kv = {"type_k": 0, "type_v": 0} if kv_f32 else {}  # GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(n_ctx, 8), logits_all=True, verbose=False,
                          n_threads=threads, n_threads_batch=threads, **kv)
    try:
        out = []
        for ids in windows:
            llm.reset()
            llm.eval(ids)
            out.append(torch.from_numpy(llm.scores[:len(ids)].copy()))
        return out
    finally:
        llm.close()


@torch.no_grad()
def _transformers_logits(model, windows: list[list[int]]) -> list[torch.Tensor]:
    return [model(torch.tensor([ids])).logits[0].float() for ids in windows]


def check_export(model_folder: str | os.PathLike, export_path: str | os.PathLike, export_format: str,
                 text_path: str | os.PathLike, tokens: int = 1000, window: int | None = None,
                 threads: int | None = None) -> AgreementReport:
    """Agreement of ``export_path`` (``export_format``: gguf, hf, compressed-tensors, packed) in its engine with
    the paretoq model in ``model_folder``, over ``tokens`` tokens of ``text_path`` in windows of ``window``
    (default min(256, max_position_embeddings))."""
    from transformers import AutoModelForCausalLM

    from paretoq.loading import load_model, load_tokenizer

    if export_format not in ENGINES:
        raise UserError(f"check: unknown export format {export_format!r} (use one of {', '.join(ENGINES)})")
    model_folder, export_path = Path(model_folder), Path(export_path)
    reference = load_model(model_folder, dtype=torch.float32)
    tokenizer = load_tokenizer(model_folder)
    window = window or min(256, int(getattr(reference.config, "max_position_embeddings", 256) or 256))
    windows = token_windows(text_path, tokenizer, tokens, window)
    ours = _transformers_logits(reference, windows)
    del reference
    if export_format == "gguf":
        theirs = _llama_cpp_logits(export_path, windows, window, threads)
    elif export_format == "packed":
        theirs = _transformers_logits(load_model(export_path, dtype=torch.float32), windows)
    else:
        engine_model = AutoModelForCausalLM.from_pretrained(export_path, dtype=torch.float32,
                                                            local_files_only=True).eval()
        theirs = _transformers_logits(engine_model, windows)
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    top1, kl, diff, n = agreement(ours, theirs)
    report = AgreementReport(ENGINES[export_format], str(text_path), n, top1, kl, diff,
                             window_perplexity(ours, windows), window_perplexity(theirs, windows))
    logger.info(report.line())
    return report
