"""Training text → tokenised, packed blocks of ``block_size`` tokens (labels = input_ids).

Sources (``read_texts``), each giving a list of documents:
- ``.jsonl`` (also ``.ndjson`` or no suffix): one ``{"text": ...}`` object per line; blank lines are
  skipped; a bad line stops with ``file:line: what is wrong``. Other suffixes (``.csv``, ...) are refused.
- ``.json``: JSON Lines as above, or one JSON array of ``{"text": ...}`` objects.
- ``.txt``: the whole file is one document, newlines kept (what transformers' ``run_clm`` does
  with text files: lines concatenated, no separator inserted between them).
- ``.parquet``: a ``text`` column of strings.
- a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` gives its "train"
  split, or its only split) with a ``text`` column.

Packing (``tokenize_and_pack``): every document becomes ``tokenizer(text,
add_special_tokens=False)`` followed by one EOS, so EOS marks each document boundary; no BOS is
added (a tokenizer that adds BOS by default would otherwise put one before every document and
none at block starts, which are cut across documents anyway). The stream is cut into rows of
``block_size`` tokens and the final partial row is dropped.

Caching (``load_blocks``): the blocks are stored once per (file content, tokenizer, block size)
as ``<cache_dir>/<name>-<key>.safetensors`` (int32 ids); written under a temporary name and
moved into place with ``os.replace``, so a crash never leaves a half-written cache file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from paretoq.errors import DataError
from paretoq.files import atomic_file

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "1"
_TOKENIZE_BATCH = 256  # documents per tokenizer call


# --- reading -----------------------------------------------------------------------------------


JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson", "")  # read line by line as JSON objects


def read_texts(path) -> list[str]:
    """The documents of a data source (see the module docstring); raises ``DataError``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            texts = _read_saved_dataset(path)
        elif path.suffix.lower() == ".txt":
            texts = _read_txt(path)
        elif path.suffix.lower() == ".parquet":
            texts = _read_parquet(path)
        elif path.suffix.lower() == ".json" and _first_char(path) == "[":
            texts = _read_json_array(path)
        elif path.suffix.lower() in JSONL_SUFFIXES:
            texts = _read_jsonl(path)
        else:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}: use JSONL (one {{\"text\": ...}} per "
                            "line), .json, .txt, .parquet or a saved datasets folder")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    if not texts:
        raise DataError(f"{path}: no documents (the file is empty or has only blank lines)")
    return texts


def _doc_from_object(obj, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f'{where}: expected a JSON object like {{"text": "..."}}, got {type(obj).__name__}')
    if "text" not in obj:
        keys = ", ".join(json.dumps(k) for k in list(obj)[:5]) or "none"
        raise DataError(f'{where}: missing the "text" field (keys: {keys})')
    text = obj["text"]
    if not isinstance(text, str):
        raise DataError(f'{where}: "text" must be a string, got {type(text).__name__}')
    return text


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            if b"\x00" in raw:
                raise DataError(f"{where}: binary data (NUL byte), not JSON Lines text")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                msg = f"not UTF-8 text (byte {e.start + 1} of the line); is it a binary file?"
                raise DataError(f"{where}: {msg}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip())  # the newline would move the error onto the next line
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}: column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{where}: invalid JSON (nested too deeply)") from None
            texts.append(_doc_from_object(obj, where))
    return texts


def _decode_whole(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{lineno}: not UTF-8 text; is it a binary file?") from None


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip()
    return head[:1]


def _read_json_array(path: Path) -> list[str]:
    try:
        items = json.loads(_decode_whole(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}: column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
    return [_doc_from_object(obj, f"{path}: item {i}") for i, obj in enumerate(items, start=1)]


def _read_txt(path: Path) -> list[str]:
    text = _decode_whole(path)
    return [text] if text.strip() else []


def _texts_from_column(column, path: Path) -> list[str]:
    texts = list(column)
    for row, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise DataError(f'{path}: row {row}: "text" must be a string, got {type(text).__name__}')
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DataError(f'{path}: no "text" column (columns: {", ".join(schema.names)})')
        table = pq.read_table(path, columns=["text"])
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    return _texts_from_column(table.column("text").to_pylist(), path)


def _read_saved_dataset(path: Path) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({first})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{path}: a DatasetDict with splits {', '.join(ds)} and no 'train' split; save one split")
    if "text" not in ds.column_names:
        raise DataError(f'{path}: no "text" column (columns: {", ".join(ds.column_names)})')
    return _texts_from_column(ds.data.column("text").to_pylist(), path)


# --- tokenising and packing --------------------------------------------------------------------


def _check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise DataError(f"model_max_length (block size) must be a positive number of tokens, got {block_size!r}")
    return int(block_size)


def tokenize_and_pack(texts, tokenizer, block_size: int, source: str = "data") -> torch.LongTensor:
    """Documents → (num_blocks, block_size) int64 tensor: each document's tokens then EOS,
    concatenated, cut into full blocks (the last partial block is dropped). ``source`` names the
    data in error messages."""
    block_size = _check_block_size(block_size)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"{source}: the tokenizer has no EOS token to separate documents (set eos_token)")
    from tqdm.auto import tqdm

    pieces, total = [], 0
    starts = range(0, len(texts), _TOKENIZE_BATCH)
    for start in tqdm(starts, desc=f"tokenizing {Path(source).name}", unit="batch", disable=len(starts) < 20):
        batch = list(texts[start : start + _TOKENIZE_BATCH])
        docs = tokenizer(batch, add_special_tokens=False)["input_ids"]
        count = sum(len(ids) + 1 for ids in docs)
        pieces.append(np.fromiter(itertools.chain.from_iterable(ids + [eos] for ids in docs), np.int64, count))
        total += count
    num_blocks = total // block_size
    if num_blocks == 0:
        raise DataError(
            f"{source}: too small: {total} tokens, fewer than one block of model_max_length={block_size}; "
            "give more text or a smaller --model_max_length"
        )
    stream = np.concatenate(pieces)[: num_blocks * block_size]
    return torch.from_numpy(stream.reshape(num_blocks, block_size))


# --- cache -------------------------------------------------------------------------------------


def _source_hash(path: Path) -> str:
    """sha256 of the file's bytes, or of every file (relative name + bytes) under a folder."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's class, its serialised form (or vocabulary) and its EOS id."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"eos={tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def load_blocks(path, tokenizer, block_size: int, cache_dir=None) -> torch.LongTensor:
    """``tokenize_and_pack(read_texts(path), ...)``, cached under ``cache_dir`` when one is given."""
    path = Path(path)
    block_size = _check_block_size(block_size)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if cache_dir is None:
        return tokenize_and_pack(read_texts(path), tokenizer, block_size, source=str(path))

    try:
        data_sha256 = _source_hash(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
    key_fields = {
        "format": CACHE_FORMAT_VERSION,
        "data_sha256": data_sha256,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "block_size": str(block_size),
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()
    cache_file = Path(cache_dir) / f"{path.name}-{key[:20]}.safetensors"
    cached = _read_cache(cache_file, key)
    if cached is not None:
        logger.info("%s: %d blocks of %d tokens from cache %s", path, len(cached), block_size, cache_file)
        return cached
    blocks = tokenize_and_pack(read_texts(path), tokenizer, block_size, source=str(path))
    _write_cache(cache_file, blocks, key)
    logger.info("%s: %d blocks of %d tokens (cached to %s)", path, len(blocks), block_size, cache_file)
    return blocks


def _read_cache(cache_file: Path, key: str):
    if not cache_file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(cache_file), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("blocks").long()
    except Exception as e:  # a corrupt or foreign file: rebuild it
        logger.warning("ignoring unreadable cache file %s (%s)", cache_file, e)
        return None


def _write_cache(cache_file: Path, blocks: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    stored = blocks.to(torch.int32) if int(blocks.max()) < 2**31 else blocks
    try:
        with atomic_file(cache_file, suffix=".safetensors") as tmp:
            save_file({"blocks": stored.contiguous()}, tmp, metadata={"key": key})
    except OSError as e:  # an unwritable cache costs time, not the run
        logger.warning("could not write the data cache %s (%s); continuing without it", cache_file, e)


# --- datasets ----------------------------------------------------------------------------------


class BlockDataset(torch.utils.data.Dataset):
    """Map-style dataset over a (num_blocks, block_size) tensor; item i is
    ``{"input_ids": blocks[i], "labels": blocks[i]}`` (int64; the model shifts the labels)."""

    def __init__(self, blocks: torch.Tensor):
        if blocks.dim() != 2:
            raise ValueError(f"blocks must be (num_blocks, block_size), got shape {tuple(blocks.shape)}")
        self.blocks = blocks.long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.blocks[i]
        return {"input_ids": row, "labels": row.clone()}


def build_datasets(
    tokenizer,
    train_path,
    eval_path=None,
    block_size: int = 2048,
    cache_dir=None,
    eval_fraction: float = 0.05,
    max_eval_blocks: int = 200,
) -> tuple[BlockDataset, BlockDataset]:
    """(train, eval) datasets. Without ``eval_path`` the LAST ``eval_fraction`` of the train
    blocks (at least 1, at most ``max_eval_blocks``, and always leaving train ≥ 1 block) are held
    out, so the split is deterministic and disjoint. Shuffling is left to the Trainer (its seed)."""
    block_size = _check_block_size(block_size)
    if not 0 < eval_fraction < 1:
        raise DataError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if max_eval_blocks < 1:
        raise DataError(f"max_eval_blocks must be at least 1, got {max_eval_blocks}")
    train_blocks = load_blocks(train_path, tokenizer, block_size, cache_dir)
    if eval_path is not None:
        eval_blocks = load_blocks(eval_path, tokenizer, block_size, cache_dir)
    else:
        n = len(train_blocks)
        if n < 2:
            raise DataError(
                f"{train_path}: too small to hold out an eval split: {n} block of model_max_length={block_size}; "
                "give more text, an eval file (--eval_data_local_path) or a smaller --model_max_length"
            )
        n_eval = min(max(1, int(n * eval_fraction + 0.5)), max_eval_blocks, n - 1)
        train_blocks, eval_blocks = train_blocks[: n - n_eval], train_blocks[n - n_eval :]
        logger.info("%s: held out the last %d of %d blocks for eval", train_path, n_eval, n)
    return BlockDataset(train_blocks), BlockDataset(eval_blocks)
