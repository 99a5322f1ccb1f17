"""`import paretoq` registers MiniCPM and the "paretoq" quant method with transformers, whatever the order
in which a program imports the two, and imports neither torch nor transformers itself. Each case runs in
a fresh interpreter (registration happens once per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import FIXTURE

F = str(FIXTURE)
CASES = {
    "paretoq alone imports neither torch nor transformers":
        ("import sys, paretoq; print(json.dumps(['torch' in sys.modules, 'transformers' in sys.modules]))",
         [False, False]),
    "AutoConfig imported after paretoq":
        (f"import paretoq; from transformers import AutoConfig; print(json.dumps(type(AutoConfig.from_pretrained({F!r})).__name__))",
         "MiniCPMConfig"),
    "AutoModelForCausalLM imported after paretoq":
        (f"import paretoq; from transformers import AutoModelForCausalLM as A; print(json.dumps(type(A.from_pretrained({F!r})).__name__))",
         "MiniCPMForCausalLM"),
    "transformers imported before paretoq":
        (f"from transformers import AutoModelForCausalLM as A; import paretoq; print(json.dumps(type(A.from_pretrained({F!r})).__name__))",
         "MiniCPMForCausalLM"),
    "LlamaConfig first, then the Auto classes":
        (f"import paretoq; from transformers import LlamaConfig, AutoModel; print(json.dumps(type(AutoModel.from_config(__import__('transformers').AutoConfig.from_pretrained({F!r}))).__name__))",
         "MiniCPMModel"),
    "the quant method, with the Trainer imported first":
        ("import paretoq; from transformers import Trainer; import transformers.quantizers.auto as q; print(json.dumps(['paretoq' in q.AUTO_QUANTIZER_MAPPING, 'paretoq' in q.AUTO_QUANTIZATION_CONFIG_MAPPING]))",
         [True, True]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_registration_in_any_import_order(case):
    code, expected = CASES[case]
    r = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == expected


def test_a_packed_folder_loads_in_a_fresh_process_after_import_paretoq(tmp_path):
    from paretoq import QuantConfig, quantize_model, save_packed
    from paretoq.loading import load_model

    model = load_model(FIXTURE)
    quantize_model(model, QuantConfig(w_bits=2))
    save_packed(model, tmp_path / "packed")
    code = ("import json, paretoq; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({str(tmp_path / 'packed')!r}); "
            "print(json.dumps(sorted({type(x).__name__ for x in m.modules() if 'Linear' in type(x).__name__})))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ["Linear", "PackedLinear"]
