"""Data loader of the ``kjv_cloze`` lm-eval task: the JSONL beside this file, no hub, no cache."""

import json
from pathlib import Path

DATA = Path(__file__).with_name("kjv_cloze.jsonl")


def load_kjv_cloze(**_metadata):
    """{"test": Dataset} of the items (citation, context, choices, label); lm-eval passes its metadata."""
    import datasets

    with open(DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
