"""Perplexity of a causal LM on a text file, tokenised exactly as for training.

The text is read and tokenised by :mod:`paretoq.data` (each document's tokens, then EOS, all
concatenated into one stream of N tokens), so ``paretoq eval`` on a trained model's eval file
scores the same tokens as the training run's own evaluation.

Windows (C = context, S = stride, 1 ≤ S ≤ C): window k covers the tokens [kS, kS + C), for every
k with kS + C ≤ N (a tail shorter than one stride is not scored, as training drops its last
partial block). Window 0 scores its tokens 1 … C−1 (token 0 has no context); every later window
scores only its last min(S, C−1) tokens, which no earlier window scored, each predicted from up
to C−1 tokens before it. So:

- S = C (the default): non-overlapping windows, the blocks of ``model_max_length`` that training
  evaluates; each window scores C−1 tokens.
- S < C: the sliding-window perplexity of the transformers docs ("Perplexity of fixed-length
  models"): every token after the first window is predicted from at least C−S tokens of context.

loss = Σ −log p(token | its window's tokens before it) / (tokens scored); perplexity = exp(loss),
accumulated in fp32 whatever the model's dtype.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from paretoq.errors import DataError, UserError

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONTEXT = 2048


@dataclass
class PerplexityResult:
    data: str
    context: int
    stride: int
    tokens: int  # N, the whole stream
    windows: int  # windows evaluated
    scored_tokens: int
    loss: float  # mean negative log-likelihood per scored token (nats)
    perplexity: float
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def token_stream(path, tokenizer) -> torch.LongTensor:
    """The 1-D token stream of a data file: documents + EOS, concatenated (``paretoq.data``)."""
    from paretoq.data import read_texts, tokenize_and_pack

    # Blocks of one token are the whole stream, nothing dropped, tokenised as for training.
    return tokenize_and_pack(read_texts(path), tokenizer, 1, source=str(path)).view(-1)


def first_scored(k: int, context: int, stride: int) -> int:
    """Position (inside window k) of the first token that window k scores."""
    return 1 if k == 0 else max(1, context - stride)


def num_windows(num_tokens: int, context: int, stride: int) -> int:
    return 0 if num_tokens < context else (num_tokens - context) // stride + 1


def check_windows(num_tokens: int, context: int, stride: int, source: str = "data") -> int:
    """The number of windows; a one-line error when the settings or the data do not allow one."""
    if context < 2:
        raise UserError(f"--context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise UserError(f"--stride must be between 1 and the context ({context}), got {stride}")
    n = num_windows(num_tokens, context, stride)
    if n == 0:
        raise DataError(f"{source}: too short for one window: {num_tokens} tokens, the window (--context) is "
                        f"{context} tokens; give more text or a smaller --context")
    return n


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def window_nll(model, windows: torch.LongTensor, first: list[int]) -> tuple[float, int]:
    """Summed NLL (fp32) and token count of a batch of windows (B, C); window i scores its tokens
    first[i] … C−1."""
    batch, context = windows.shape
    lo = min(first)  # logits needed for positions lo−1 … C−2
    kwargs = {"input_ids": windows, "use_cache": False}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = context - lo + 1
    logits = model(**kwargs).logits
    logits = logits[:, -(context - lo + 1):-1].float()  # (B, C−lo, V): predictions of tokens lo … C−1
    targets = windows[:, lo:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(batch, context - lo)
    positions = torch.arange(lo, context, device=windows.device)
    mask = positions[None, :] >= torch.tensor(first, device=windows.device)[:, None]
    return float(nll[mask].sum(dtype=torch.float64)), int(mask.sum())


def evaluate_perplexity(model, stream: torch.LongTensor, context: int, stride: int | None = None,
                        batch_size: int = 4, max_windows: int | None = None, source: str = "data",
                        progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` over the windows of a token stream (see the module docstring)."""
    from tqdm.auto import tqdm

    stride = context if stride is None else stride
    total = check_windows(len(stream), context, stride, source)
    if batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {batch_size}")
    if max_windows is not None:
        if max_windows < 1:
            raise UserError(f"--max_windows must be at least 1, got {max_windows}")
        total = min(total, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    start = time.perf_counter()
    try:
        with tqdm(total=total, desc="perplexity", unit="window", disable=not progress) as bar:
            for b in range(0, total, batch_size):
                ks = range(b, min(b + batch_size, total))
                windows = torch.stack([stream[k * stride: k * stride + context] for k in ks]).to(device)
                s, n = window_nll(model, windows, [first_scored(k, context, stride) for k in ks])
                nll_sum, count = nll_sum + s, count + n
                bar.update(len(ks))
                bar.set_postfix(ppl=f"{perplexity_from_loss(nll_sum / count):.3f}")
    finally:
        model.train(was_training)
    loss = nll_sum / count
    return PerplexityResult(data=source, context=context, stride=stride, tokens=len(stream), windows=total,
                            scored_tokens=count, loss=loss, perplexity=perplexity_from_loss(loss),
                            seconds=round(time.perf_counter() - start, 3))


def perplexity_from_loss(x: float) -> float:
    """exp(mean cross-entropy in nats), inf where it overflows."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def default_context(model_dir, config: dict | None = None) -> int:
    """``model_max_length`` from the folder's paretoq_config.yaml (the training block size), else
    min(2048, max_position_embeddings)."""
    import yaml

    saved = Path(model_dir) / "paretoq_config.yaml"
    if saved.is_file():
        try:
            value = (yaml.safe_load(saved.read_text()) or {}).get("model_max_length")
        except yaml.YAMLError:
            value = None
        if isinstance(value, int) and value > 1:
            return value
    max_pos = (config or {}).get("max_position_embeddings")
    return min(DEFAULT_MAX_CONTEXT, max_pos) if isinstance(max_pos, int) and max_pos > 1 else DEFAULT_MAX_CONTEXT


def perplexity_of_file(model, tokenizer, path, context: int, stride: int | None = None, batch_size: int = 4,
                       max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """``evaluate_perplexity`` on a data file (any format ``paretoq.data.read_texts`` reads)."""
    stream = token_stream(path, tokenizer)
    return evaluate_perplexity(model, stream, context, stride, batch_size, max_windows, source=str(path),
                               progress=progress)
