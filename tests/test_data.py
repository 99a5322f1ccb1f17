"""paretoq.data on the real fixture tokenizer and the real KJV text: exact block counts, EOS at
document boundaries, the cache, the held-out split and one-line errors naming file:line."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from paretoq import data
from paretoq.data import BlockDataset, build_datasets, load_blocks, read_texts, tokenize_and_pack
from paretoq.errors import DataError, UserError

from conftest import FIXTURE as TINY, TEXT

KJV_TRAIN = TEXT / "kjv_train.jsonl"
KJV_EVAL = TEXT / "kjv_eval.jsonl"

# Fixture facts (byte-level BPE of 512 entries, EOS id 2): Σ(len(doc tokens) + 1).
KJV_TRAIN_DOCS, KJV_TRAIN_TOKENS, KJV_EVAL_TOKENS = 90, 146329, 5459


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # The fixture's real tokenizer files, loaded without its config.json so that the test does
    # not depend on the MiniCPM model classes being registered.
    d = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / name, d / name)
    return AutoTokenizer.from_pretrained(d)


@pytest.fixture(scope="module")
def kjv_texts():
    return [json.loads(line)["text"] for line in KJV_TRAIN.read_text(encoding="utf-8").splitlines()]


def doc_lengths(tok, texts):
    return [len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts]


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def count_packing(monkeypatch):
    calls = []
    real = data.tokenize_and_pack

    def counted(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs["block_size"])
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "tokenize_and_pack", counted)
    return calls


# --- packing -----------------------------------------------------------------------------------


def test_read_kjv(kjv_texts):
    texts = read_texts(KJV_TRAIN)
    assert len(texts) == KJV_TRAIN_DOCS
    assert texts == kjv_texts
    assert texts[0].startswith("In the beginning God created the heaven and the earth.")


@pytest.mark.parametrize("block_size", [64, 1000])
def test_block_count_stream_and_eos_boundaries(tok, kjv_texts, block_size):
    lengths = doc_lengths(tok, kjv_texts)
    assert sum(lengths) == KJV_TRAIN_TOKENS
    blocks = tokenize_and_pack(kjv_texts, tok, block_size)
    n = KJV_TRAIN_TOKENS // block_size
    assert blocks.dtype == torch.int64 and blocks.shape == (n, block_size)

    expected = []
    for text in kjv_texts:
        expected += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert blocks.flatten().tolist() == expected[: n * block_size]  # the partial tail is dropped

    eos_positions = (blocks.flatten() == tok.eos_token_id).nonzero().flatten().tolist()
    ends, pos = [], -1
    for length in lengths:
        pos += length
        ends.append(pos)
    assert eos_positions == [e for e in ends if e < n * block_size]
    assert tok.eos_token_id == 2 and tok.bos_token_id not in blocks  # no BOS is inserted


def test_block_dataset_items(tok, kjv_texts):
    blocks = tokenize_and_pack(kjv_texts[:3], tok, 128)
    ds = BlockDataset(blocks)
    assert len(ds) == sum(doc_lengths(tok, kjv_texts[:3])) // 128 == (1582 + 1196 + 1366) // 128
    item = ds[5]
    assert set(item) == {"input_ids", "labels"}
    assert item["input_ids"].dtype == item["labels"].dtype == torch.int64
    assert torch.equal(item["input_ids"], item["labels"]) and torch.equal(item["input_ids"], blocks[5])


# --- cache -------------------------------------------------------------------------------------


def test_cache_hit_and_invalidation(tok, tmp_path, monkeypatch):
    calls = count_packing(monkeypatch)
    src = tmp_path / "train.jsonl"
    shutil.copy(KJV_TRAIN, src)
    cache = tmp_path / "cache"

    first = load_blocks(src, tok, 64, cache_dir=cache)
    assert calls == [64] and first.shape == (KJV_TRAIN_TOKENS // 64, 64)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temp files, no pickle

    again = load_blocks(src, tok, 64, cache_dir=cache)
    assert calls == [64] and again.dtype == torch.int64 and torch.equal(again, first)

    load_blocks(src, tok, 128, cache_dir=cache)  # block size is part of the key
    assert calls == [64, 128]

    with open(src, "a", encoding="utf-8") as f:  # so is the file content
        f.write(json.dumps({"text": "And it came to pass."}) + "\n")
    changed = load_blocks(src, tok, 64, cache_dir=cache)
    assert calls == [64, 128, 64]
    assert len(changed) == (KJV_TRAIN_TOKENS + doc_lengths(tok, ["And it came to pass."])[0]) // 64
    assert len(list(cache.iterdir())) == 3

    load_blocks(src, tok, 64)  # no cache_dir → no cache
    assert calls == [64, 128, 64, 64]


def test_cache_depends_on_tokenizer(tok, tmp_path):
    other = AutoTokenizer.from_pretrained(tok.name_or_path)
    assert data.tokenizer_fingerprint(other) == data.tokenizer_fingerprint(tok)
    other.add_tokens(["Pharaoh"])
    assert data.tokenizer_fingerprint(other) != data.tokenizer_fingerprint(tok)


def test_corrupt_cache_is_rebuilt(tok, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_blocks(KJV_EVAL, tok, 32, cache_dir=cache)
    (cache_file,) = cache.iterdir()
    cache_file.write_bytes(b"not a safetensors file")
    calls = count_packing(monkeypatch)
    assert torch.equal(load_blocks(KJV_EVAL, tok, 32, cache_dir=cache), first)
    assert calls == [32]
    assert torch.equal(load_blocks(KJV_EVAL, tok, 32, cache_dir=cache), first) and calls == [32]


def test_unwritable_cache_dir_is_not_fatal(tok, tmp_path, caplog):
    not_a_dir = write(tmp_path / "file", "x")
    blocks = load_blocks(KJV_EVAL, tok, 32, cache_dir=not_a_dir / "cache")
    assert blocks.shape == (KJV_EVAL_TOKENS // 32, 32)
    assert "could not write the data cache" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# --- splits ------------------------------------------------------------------------------------


def test_eval_split_from_two_documents(tok, kjv_texts, tmp_path):
    src = write(tmp_path / "two.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in kjv_texts[:2]))
    n = (1582 + 1196) // 64  # 43 blocks → round(43 · 0.05) = 2 held out
    train, evals = build_datasets(tok, src, block_size=64)
    assert (len(train), len(evals)) == (n - 2, 2)
    all_blocks = tokenize_and_pack(kjv_texts[:2], tok, 64)
    assert torch.equal(train.blocks, all_blocks[: n - 2]) and torch.equal(evals.blocks, all_blocks[n - 2 :])


def test_eval_split_two_blocks_and_one_block(tok, tmp_path):
    texts = ["In the beginning God created the heaven and the earth.", "And God said, Let there be light."]
    total = sum(doc_lengths(tok, texts))
    src = write(tmp_path / "tiny.jsonl", "\n\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    train, evals = build_datasets(tok, src, block_size=total // 2)  # exactly 2 blocks
    all_blocks = tokenize_and_pack(texts, tok, total // 2)
    assert (len(train), len(evals)) == (1, 1) and len(all_blocks) == 2
    assert torch.equal(train.blocks, all_blocks[:1]) and torch.equal(evals.blocks, all_blocks[1:])
    message = rf"^{re.escape(str(src))}: too small to hold out an eval split: 1 block of model_max_length={total};"
    with pytest.raises(DataError, match=message):
        build_datasets(tok, src, block_size=total)


def test_eval_split_is_capped(tok):
    train, evals = build_datasets(tok, KJV_TRAIN, block_size=16, max_eval_blocks=200)
    assert len(evals) == 200 and len(train) == KJV_TRAIN_TOKENS // 16 - 200
    train, evals = build_datasets(tok, KJV_TRAIN, block_size=512, eval_fraction=0.1)
    assert (len(train), len(evals)) == (285 - 29, 29)  # 146329 // 512 = 285


def test_eval_file(tok):
    train, evals = build_datasets(tok, KJV_TRAIN, KJV_EVAL, block_size=100)
    assert (len(train), len(evals)) == (KJV_TRAIN_TOKENS // 100, KJV_EVAL_TOKENS // 100)


# --- other sources -----------------------------------------------------------------------------


def test_blank_lines_skipped(tmp_path):
    src = write(tmp_path / "b.jsonl", '\n  \n{"text": "one"}\n\t\n\r\n{"text": "two"}\n\n')
    assert read_texts(src) == ["one", "two"]


def test_saved_dataset_folder(tok, kjv_texts, tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": kjv_texts[:5], "id": list(range(5))}).save_to_disk(str(folder))
    assert read_texts(folder) == kjv_texts[:5]
    expected = tokenize_and_pack(kjv_texts[:5], tok, 64)
    assert torch.equal(load_blocks(folder, tok, 64, cache_dir=tmp_path / "c"), expected)
    assert torch.equal(load_blocks(folder, tok, 64, cache_dir=tmp_path / "c"), expected)  # from cache

    split_folder = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": kjv_texts[:2]}),
                          "test": datasets.Dataset.from_dict({"text": kjv_texts[2:3]})}).save_to_disk(str(split_folder))
    assert read_texts(split_folder) == kjv_texts[:2]


def test_parquet_json_and_txt(kjv_texts, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": kjv_texts[:3]}).to_parquet(str(tmp_path / "d.parquet"))
    assert read_texts(tmp_path / "d.parquet") == kjv_texts[:3]
    write(tmp_path / "a.json", json.dumps([{"text": t} for t in kjv_texts[:2]], indent=1))
    assert read_texts(tmp_path / "a.json") == kjv_texts[:2]
    write(tmp_path / "l.json", "".join(json.dumps({"text": t}) + "\n" for t in kjv_texts[:2]))
    assert read_texts(tmp_path / "l.json") == kjv_texts[:2]
    write(tmp_path / "book.txt", "line one\nline two\n\nline three\n")
    assert read_texts(tmp_path / "book.txt") == ["line one\nline two\n\nline three\n"]


def test_long_line_is_read(tmp_path):
    text = "a" * (11 << 20)
    assert read_texts(write(tmp_path / "long.jsonl", json.dumps({"text": text}) + "\n")) == [text]


# --- errors: one line, naming the file and line ------------------------------------------------

BAD_JSONL = [
    ('{"text": "ok"}\n\n{"text": "a" "b"}\n', r":3: invalid JSON \(Expecting ',' delimiter: column 14\)$"),
    ('{"text": "ok"}\n{"text": "a"\r\n', r":2: invalid JSON \(Expecting ',' delimiter: column 13\)$"),
    ('["text", "a"]\n', r':1: expected a JSON object like \{"text": "..."\}, got list$'),
    ('{"text": "ok"}\n"text"\n', r":2: expected a JSON object .* got str$"),
    ('\n\n{"txt": "a", "id": 1}\n', r':3: missing the "text" field \(keys: "txt", "id"\)$'),
    ('{"text": 5}\n', r':1: "text" must be a string, got int$'),
    ('{"text": null}\n', r':1: "text" must be a string, got NoneType$'),
    (b'{"text": "ok"}\n{"text": "\xff\xfe"}\n', r":2: not UTF-8 text \(byte 11 of the line\); is it a binary file\?$"),
    (b'{"text": "ok"}\n\x00\x01\x02\x03\n', r":2: binary data \(NUL byte\), not JSON Lines text$"),
]


@pytest.mark.parametrize("content,message", BAD_JSONL)
def test_bad_jsonl_line(tmp_path, content, message):
    src = write(tmp_path / "train.jsonl", content)
    with pytest.raises(DataError, match="^" + re.escape(str(src)) + message) as e:
        read_texts(src)
    assert "\n" not in str(e.value) and isinstance(e.value, UserError)


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
def test_empty_file(tmp_path, content):
    src = write(tmp_path / "empty.jsonl", content)
    message = rf"^{re.escape(str(src))}: no documents \(the file is empty or has only blank lines\)$"
    with pytest.raises(DataError, match=message):
        read_texts(src)


def test_missing_file(tok, tmp_path):
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}/nope\.jsonl: no such file or folder$"):
        read_texts(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        build_datasets(tok, tmp_path / "nope.jsonl", block_size=8, cache_dir=tmp_path / "c")


def test_too_small_names_file_tokens_and_block(tok, tmp_path):
    text = "And God said, Let there be light"
    n = len(tok(text, add_special_tokens=False)["input_ids"]) + 1
    src = write(tmp_path / "short.jsonl", json.dumps({"text": text}) + "\n")
    message = rf"^{re.escape(str(src))}: too small: {n} tokens, fewer than one block of model_max_length=2048;"
    with pytest.raises(DataError, match=message):
        load_blocks(src, tok, 2048, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())
    with pytest.raises(DataError, match=rf"kjv_eval\.jsonl: too small: {KJV_EVAL_TOKENS} tokens"):
        build_datasets(tok, KJV_TRAIN, KJV_EVAL, block_size=8192)


@pytest.mark.parametrize("block_size", [0, -4, 1.5, None])
def test_bad_block_size(tok, block_size):
    message = rf"^model_max_length \(block size\) must be a positive number of tokens, got {block_size}$"
    with pytest.raises(DataError, match=message):
        build_datasets(tok, KJV_EVAL, block_size=block_size)
    with pytest.raises(DataError, match="must be a positive number"):
        tokenize_and_pack(["text"], tok, block_size)


def test_binary_txt_names_line(tmp_path):
    src = write(tmp_path / "notes.txt", b"fine\nalso fine\n\x89PNG\xff\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(src))}:3: not UTF-8 text; is it a binary file\?$"):
        read_texts(src)


def test_bad_folder_and_parquet(tmp_path):
    import datasets

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x.txt").write_text("hi")
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder))}: not a folder written by datasets' save_to_disk"):
        read_texts(folder)
    datasets.Dataset.from_dict({"body": ["a"]}).to_parquet(str(tmp_path / "d.parquet"))
    with pytest.raises(DataError, match=r'd\.parquet: no "text" column \(columns: body\)$'):
        read_texts(tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"fake\.parquet: not a readable Parquet file"):
        read_texts(write(tmp_path / "fake.parquet", '{"text": "a"}\n'))
    with pytest.raises(DataError, match=r'arr\.json: item 2: "text" must be a string, got int$'):
        read_texts(write(tmp_path / "arr.json", '[{"text": "a"}, {"text": 3}]'))
    with pytest.raises(DataError, match=r"arr2\.json:3: invalid JSON"):
        read_texts(write(tmp_path / "arr2.json", '[\n{"text": "a"},\n{"text" "b"}]'))
