"""Mixed precision (issue #31): per-layer overrides in QuantConfig, the exact allocator, the sensitivity
estimate against the true loss increase, `paretoq allocate` and `paretoq train --quant_config`."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch

from conftest import FIXTURE, TEXT, tiny_llama, train_argv
from paretoq.allocate import (Candidate, allocation_config, candidate_bytes, candidate_weights, measure_sensitivity,
                              parse_candidates, solve)
from paretoq.errors import QuantConfigError, UserError
from paretoq.quant.config import LayerOverride, QuantConfig, load_quant_config, quant_config_yaml


def _brute(losses, costs, budget):
    best = None
    for choice in itertools.product(*[range(len(r)) for r in losses]):
        cost = sum(costs[i][k] for i, k in enumerate(choice))
        if cost <= budget:
            loss = sum(losses[i][k] for i, k in enumerate(choice))
            if best is None or loss < best[0] - 1e-12:
                best = (loss, choice)
    return best


# --- the solver -------------------------------------------------------------------------------------


def test_hand_checkable_optimum_beats_greedy():
    """Three layers, 2 or 4 "bits" (cost 2 / 4), budget 8 allows one upgrade: the optimum upgrades the layer
    with the largest gain (layer 1: 9 → 1), though layer 0 has the largest gain per byte at first sight
    when the candidates are 2/3/4 — a greedy by loss-per-byte on the 3-bit step picks layer 0 and is worse."""
    losses = [[10.0, 4.5, 4.0], [9.0, 8.0, 1.0], [1.0, 0.9, 0.8]]
    costs = [[2, 3, 4], [2, 3, 4], [2, 3, 4]]
    a = solve(losses, costs, 8)
    assert a.exact and a.choice == [0, 2, 0] and a.loss == 12.0 and a.bytes == 8
    # control: greedy by best marginal gain per byte takes layer 0's step 2→3 (5.5 per byte) first
    choice, spent = [0, 0, 0], 6
    while True:
        steps = [((losses[i][choice[i]] - losses[i][choice[i] + 1]) / (costs[i][choice[i] + 1] - costs[i][choice[i]]), i)
                 for i in range(3) if choice[i] + 1 < 3 and spent + costs[i][choice[i] + 1] - costs[i][choice[i]] <= 8]
        if not steps:
            break
        _, i = max(steps)
        spent += costs[i][choice[i] + 1] - costs[i][choice[i]]
        choice[i] += 1
    greedy = sum(losses[i][k] for i, k in enumerate(choice))
    assert greedy > a.loss  # 10 - 5.5 ... the greedy ends at 4.5 + 8 + 1 = 13.5 > 12


@pytest.mark.parametrize("seed", range(12))
def test_exact_on_random_cases_equals_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    costs = [[rng.choice([3, 6, 9, 12, 15]) for _ in range(k)] for _ in range(n)]
    losses = [[rng.uniform(0, 10) for _ in range(k)] for _ in range(n)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    budget = rng.randint(lo, hi)
    a = solve(losses, costs, budget)
    want = _brute(losses, costs, budget)
    assert a.exact and a.unit % 3 == 0 or a.unit == 1  # the gcd of the extra costs (1: all equal)
    assert a.bytes <= budget
    assert a.loss == pytest.approx(want[0], abs=1e-9)


@pytest.mark.parametrize("seed", range(8))
def test_rounded_grid_never_exceeds_budget_and_bounds_the_gap(seed):
    """With a coarse grid (resolution 7 states) the costs are rounded up: the choice still fits the budget,
    its loss is ≥ the true optimum and the reported lower bound is ≤ it."""
    rng = random.Random(100 + seed)
    n, k = rng.randint(2, 6), 3
    costs = [[rng.randint(50, 400) for _ in range(k)] for _ in range(n)]
    losses = [sorted((rng.uniform(0, 5) for _ in range(k)), reverse=True) for _ in range(n)]
    costs = [sorted(c) for c in costs]
    budget = sum(c[1] for c in costs) + 17
    a = solve(losses, costs, budget, resolution=7)
    want = _brute(losses, costs, budget)
    assert not a.exact and a.bytes <= budget
    assert a.loss >= want[0] - 1e-9
    assert a.lower_bound <= want[0] + 1e-9


def test_infeasible_budget_is_refused():
    with pytest.raises(UserError, match=r"budget of 5 bytes is infeasible: the cheapest candidate of every layer "
                                        r"already takes 6 bytes"):
        solve([[1.0, 0.0], [1.0, 0.0]], [[3, 6], [3, 6]], 5)
    assert solve([[1.0, 0.0], [1.0, 0.0]], [[3, 6], [3, 6]], 6).choice == [0, 0]


def test_candidate_bytes_count_codes_and_fp16_scales():
    assert candidate_bytes(Candidate(4), 8, 64) == 8 * 64 // 2 + 8 * 2
    assert candidate_bytes(Candidate(3, 32), 8, 64) == 8 * 64 * 3 // 8 + 8 * 2 * 2
    assert candidate_bytes(Candidate(1.58), 8, 64) == -(-8 * 64 // 5) + 16  # base-3: 5 codes per byte
    assert candidate_bytes(Candidate(1.58), 8, 64, "2bit") == 8 * 64 // 4 + 16
    assert candidate_bytes(Candidate(16), 8, 64) == 8 * 64 * 2


def test_parse_candidates():
    assert parse_candidates("1.58, 2,3:64,off") == [Candidate(1.58), Candidate(2), Candidate(3, 64), Candidate(16)]
    for bad, msg in (("2,2", "given twice"), ("3:x", "must be a number"), ("5", "not supported"), ("", "empty")):
        with pytest.raises(UserError, match=msg):
            parse_candidates(bad)


# --- QuantConfig overrides ----------------------------------------------------------------------------


def test_overrides_first_match_wins_and_off():
    c = QuantConfig(w_bits=3, group_size=32, overrides=[
        {"pattern": r"layers\.0\.mlp", "w_bits": 4},  # group_size left out: the default's (32)
        {"pattern": r"mlp\.down_proj$", "w_bits": "off"},
        {"pattern": r"q_proj$", "w_bits": 2, "group_size": None}])
    assert (c.for_layer("model.layers.0.mlp.down_proj").w_bits, c.for_layer("model.layers.0.mlp.down_proj").group_size) == (4, 32)
    assert not c.selects("model.layers.1.mlp.down_proj")  # "off"
    assert c.selects("model.layers.0.mlp.down_proj")
    assert (c.for_layer("model.layers.1.self_attn.q_proj").w_bits, c.for_layer("model.layers.1.self_attn.q_proj").group_size) == (2, None)
    assert c.for_layer("model.layers.1.self_attn.k_proj").w_bits == 3
    assert c.enabled and c.mixed and [s.bits for s in c.schemes()] == [3, 4, 2]
    assert QuantConfig(w_bits=16, overrides=[("q_proj", 4)]).enabled  # only an override quantizes
    assert not QuantConfig(w_bits=16, overrides=[("q_proj", 16)]).enabled


def test_overrides_round_trip_dict_and_yaml(tmp_path):
    c = QuantConfig(w_bits=3, scale_init="mse", overrides=[LayerOverride("^a$", 4, 64), LayerOverride("b", 16)])
    d = c.to_dict()
    assert d["overrides"] == [{"pattern": "^a$", "w_bits": 4, "group_size": 64}, {"pattern": "b", "w_bits": 16, "group_size": None}]
    assert QuantConfig.from_dict(d) == c and QuantConfig.from_dict(d).same_layers(c)
    assert "overrides" not in QuantConfig(w_bits=3).to_dict()  # uniform folders read as before
    path = tmp_path / "q.yaml"
    path.write_text(quant_config_yaml(c, "a comment"))
    assert path.read_text().startswith("# a comment\n")
    assert load_quant_config(path) == c
    # control: another override is another set of layers
    assert not QuantConfig(w_bits=3, overrides=[LayerOverride("^a$", 2, 64)]).same_layers(c)


@pytest.mark.parametrize("text, message", [
    ("w_bits: 3\noverrides: [{pattern: 'x', w_bits: 5}]", "w_bits 5 is not supported"),
    ("w_bits: 3\noverrides: [{pattern: '(', w_bits: 2}]", "not a valid regular expression"),
    ("w_bits: 3\noverrides: [{pattern: 'x', bits: 2}]", "unknown key 'bits'"),
    ("w_bits: 3\nlayers: []", "unknown key 'layers'"),
    ("- 1", "expected a mapping"),
])
def test_bad_quant_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(QuantConfigError, match=message):
        load_quant_config(path)


# --- a mixed model: quantize, save, pack, reload ------------------------------------------------------

MIX = QuantConfig(w_bits=3, overrides=[(r"layers\.0\.self_attn\.[qk]_proj$", 4), (r"layers\.1\.mlp", 2, 32),
                                       (r"layers\.0\.mlp\.down_proj$", "off"), (r"v_proj$", 1.58)])


def _mixed_model():
    from paretoq import quantize_model

    model = tiny_llama(layers=2, hidden=64, vocab=128, seed=3)
    quantize_model(model, MIX)
    return model


def test_quantize_model_applies_each_layers_settings():
    from paretoq.quant.linear import QuantLinear

    model = _mixed_model()
    got = {n: (m.quant_config.w_bits, m.group_size, tuple(m.weight_clip_val.shape))
           for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert got["model.layers.0.self_attn.q_proj"] == (4, None, (64, 1))
    assert got["model.layers.1.mlp.up_proj"] == (2, 32, (128, 2))
    assert got["model.layers.1.mlp.down_proj"] == (2, 32, (64, 4))
    assert got["model.layers.0.self_attn.v_proj"] == (1.58, None, (32, 1))
    assert got["model.layers.1.self_attn.o_proj"] == (3, None, (64, 1))
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear  # "off"
    assert model.config.quantization_config["overrides"][1]["group_size"] == 32


def test_mixed_round_trip_fake_and_packed(tmp_path):
    """train-format folder → reload: same logits; packed folder → reload: same logits as the fake-quant
    model with its scales rounded to fp16 (the packed contract), and info lists every layer's bits."""
    from transformers import AutoModelForCausalLM

    from paretoq.export.packed import load_packed, save_packed
    from paretoq.loading import folder_info
    from paretoq.quant.packed import PackedLinear

    model = _mixed_model()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "fake")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)
    save_packed(model, tmp_path / "packed", scale_dtype="float32", dtype="float32")
    packed = load_packed(tmp_path / "packed")
    assert packed.model.layers[1].mlp.up_proj.bits == 2 and packed.model.layers[1].mlp.up_proj.group_size == 32
    assert isinstance(packed.model.layers[0].self_attn.v_proj, PackedLinear)
    assert packed.model.layers[0].self_attn.v_proj.bits == 1.58
    assert type(packed.model.layers[0].mlp.down_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, want, rtol=0, atol=1e-5)
    info = folder_info(tmp_path / "packed")
    assert info["mixed"] and info["layer_bits"]["model.layers.0.self_attn.k_proj"]["w_bits"] == 4
    # mean w_bits by weights: q,k 4 (2·64·64... k has 32 rows), computed independently here
    sizes = {n: m.in_features * m.out_features for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    bits = {n: m.bits for n, m in packed.named_modules() if isinstance(m, PackedLinear)}
    assert info["mean_w_bits"] == pytest.approx(sum(bits[n] * sizes[n] for n in sizes) / sum(sizes.values()))
    # control: a packed folder whose config lost the overrides does not load (the buffers do not fit)
    cfg = json.loads((tmp_path / "packed" / "config.json").read_text())
    del cfg["quantization_config"]["overrides"]
    (tmp_path / "packed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception):
        load_packed(tmp_path / "packed")


def test_info_shows_every_layers_bits(tmp_path):
    from paretoq.cli.info import format_info
    from paretoq.export.packed import save_packed
    from paretoq.loading import folder_info

    save_packed(_mixed_model(), tmp_path / "p")
    text = format_info(folder_info(tmp_path / "p"))
    assert "packed: mixed precision (per-layer bits below); scales in float16" in text
    assert ("  4-bit, per row: 2 layer(s), 6,144 weights\n    model.layers.{0}.self_attn.q_proj\n"
            "    model.layers.{0}.self_attn.k_proj\n  3-bit, per row: 6 layer(s), 30,720 weights") in text
    assert "  2-bit, per group of 32: 3 layer(s), 24,576 weights\n" in text
    assert "  1.58-bit, per row: 2 layer(s), 4,096 weights\n    model.layers.{0-1}.self_attn.v_proj" in text
    assert "2.630 mean w_bits (weighted by weights; no scales); 3.000 packed (codes + fp16 scales)" in text

# --- the sensitivity estimate ---------------------------------------------------------------------


def _true_delta(model, name, w_hat, ids):
    import torch.nn.functional as F

    def loss():
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    lin = model.get_submodule(name)
    base, original = loss(), lin.weight.data.clone()
    lin.weight.data.copy_(w_hat)
    out = loss() - base
    lin.weight.data.copy_(original)
    return out


def _fixture_setup():
    from paretoq.data import load_blocks
    from paretoq.loading import load_model, load_tokenizer
    from paretoq.training.recipe import calibration_blocks

    model = load_model(FIXTURE, dtype=torch.float32)
    ids = calibration_blocks(load_blocks(TEXT / "kjv_train.jsonl", load_tokenizer(FIXTURE), 64), 4, 0)
    return model, ids


@pytest.mark.parametrize("wrong", [False, True])
def test_first_order_term_is_the_directional_derivative(wrong):
    """The recorded first-order term (1/T) Σ_t g_t·(ΔW x_t) is the derivative of the mean loss in the
    direction ΔW: it equals the central difference (L(W + εΔW) − L(W − εΔW))/2ε within 1%, for every layer of the fixture.
    That checks what the backward hooks capture (each layer's own input and output gradient). Control
    (wrong=True): two layers' perturbations scored at each other's hooks are caught."""
    model, ids = _fixture_setup()
    eps = 0.1  # central differences: the quadratic term cancels; fp32 rounding of the loss stays < 1e-3 relative
    names = [n for n, m in model.named_modules() if QuantConfig(w_bits=2).selects(n) and isinstance(m, torch.nn.Linear)]
    weights = candidate_weights(model, names, [Candidate(2)], "reference")
    deltas = {n: [eps * (weights[n][0] - model.get_submodule(n).weight.detach())] for n in names}
    scored = dict(deltas)
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    if wrong:  # q_proj's and o_proj's perturbations (same shape) swapped: each scored at the other's hook
        scored[q], scored[o] = deltas[o], deltas[q]
    sens = measure_sensitivity(model, ids, [Candidate(2)], deltas=scored, batch_size=4, dtype=torch.float32)
    ok = {}
    for li, name in enumerate(sens.layers):
        w = model.get_submodule(name).weight.detach().clone()
        d = deltas[name][0]
        fd = (_true_delta(model, name, w + d, ids) - _true_delta(model, name, w - d, ids)) / (2 * eps)
        ok[name] = abs(sens.first_order[li][0] / eps - fd) <= 0.01 * abs(fd) + 1e-5
    assert [n for n, good in ok.items() if not good] == ([q, o] if wrong else [])
    assert all(v[0] > 0 for v in sens.delta_loss)  # the Fisher term: ½·mean (g·δy)² > 0


def test_fisher_term_grows_with_the_weight_error():
    """ΔW scaled by 2 scales the Fisher term by 4 exactly (it is quadratic), per layer; 1.58 bits scores above
    4 bits in every layer of the fixture (its weight error is larger everywhere)."""
    model, ids = _fixture_setup()
    names = [n for n, m in model.named_modules() if QuantConfig(w_bits=2).selects(n) and isinstance(m, torch.nn.Linear)]
    cands = [Candidate(1.58), Candidate(4)]
    weights = candidate_weights(model, names, cands, "reference")
    d = {n: [weights[n][k] - model.get_submodule(n).weight.detach() for k in range(2)] for n in names}
    one = measure_sensitivity(model, ids, cands, deltas=d, batch_size=4, dtype=torch.float32)
    two = measure_sensitivity(model, ids, cands, deltas={n: [2 * x for x in v] for n, v in d.items()}, batch_size=4,
                              dtype=torch.float32)
    for a, b in zip(one.delta_loss, two.delta_loss):
        assert b[0] == pytest.approx(4 * a[0], rel=1e-9) and b[1] == pytest.approx(4 * a[1], rel=1e-9)
    assert all(row[0] > row[1] for row in one.delta_loss)
    # measured with the candidates' own weights (no deltas given): the same numbers
    direct = measure_sensitivity(model, ids, cands, batch_size=4, dtype=torch.float32)
    assert [v for row in direct.delta_loss for v in row] == pytest.approx([v for row in one.delta_loss for v in row], rel=1e-6)
    # the default bf16 products: the same scores to ~1%
    fast = measure_sensitivity(model, ids, cands, batch_size=4)
    assert [v for row in fast.delta_loss for v in row] == pytest.approx([v for row in one.delta_loss for v in row], rel=3e-2)


# --- the commands ---------------------------------------------------------------------------------


def _cli(argv):
    from paretoq.cli import main

    return main(argv)


def test_allocate_command_writes_a_config_that_trains(tmp_path, capsys):
    out = tmp_path / "alloc.yaml"
    sens = tmp_path / "sens.json"
    rc = _cli(["allocate", "--model", str(FIXTURE), "--data", str(TEXT / "kjv_train.jsonl"), "--budget", "2.5",
               "--candidates", "2,3,4", "--calibration_samples", "4", "--block", "32", "--out", str(out),
               "--sensitivity", str(sens)])
    assert rc == 0
    config = load_quant_config(out)
    assert config.mixed and "2.5000" in out.read_text().splitlines()[1]
    assert "(score clipped;" in out.read_text().splitlines()[2]  # the default score, named in the header
    first = capsys.readouterr().out
    bpw = float(first.split(": ")[1].split(" bits")[0])
    assert 2.3 < bpw <= 2.5
    # the cached sensitivities give the same file, without the model; an infeasible budget: one line, exit 2
    rc = _cli(["allocate", "--budget", "1.5", "--candidates", "2,3,4", "--sensitivity", str(sens)])
    assert rc == 2
    assert "infeasible: the cheapest candidate of every layer already takes" in capsys.readouterr().err
    # an unknown score is refused before any measurement: one line, exit 2, nothing written
    rc = _cli(["allocate", "--model", str(FIXTURE), "--data", str(TEXT / "kjv_train.jsonl"), "--budget", "2.5",
               "--estimate", "hessian", "--out", str(tmp_path / "x.yaml"), "--sensitivity", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "--estimate: invalid choice: 'hessian'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "x.json").exists()
    # train it: the final folder holds each layer's bits
    from paretoq.loading import folder_info

    run = tmp_path / "run"
    rc = _cli(["train", *train_argv(run, steps=2, bits=None, quant_config=out, save_steps=None,
                                    save_strategy="no")])
    assert rc == 0
    info = folder_info(run)
    want = {n: config.for_layer(n).w_bits for n in info["quantized_layers"]}
    assert {n: v["w_bits"] for n, v in info["layer_bits"].items()} == want
    assert len(set(want.values())) > 1


def test_train_refuses_conflicting_flags(tmp_path):
    from paretoq.training.args import parse_train_args

    path = tmp_path / "q.yaml"
    path.write_text(quant_config_yaml(QuantConfig(w_bits=3, scale_init="mse", overrides=[("q_proj", 4)])))
    cfg = parse_train_args(train_argv(tmp_path / "o", bits=None, quant_config=path))
    assert cfg.quant.for_layer("x.q_proj").w_bits == 4 and cfg.quant.scale_init == "mse"
    assert parse_train_args(train_argv(tmp_path / "o", bits=3, quant_config=path)).quant.mixed  # agrees: fine
    with pytest.raises(UserError, match=r"--w_bits 2 conflicts with --quant_config .*q.yaml \(w_bits: 3\)"):
        parse_train_args(train_argv(tmp_path / "o", bits=2, quant_config=path))
    with pytest.raises(UserError, match=r"--group_size 32 conflicts"):
        parse_train_args(train_argv(tmp_path / "o", bits=None, quant_config=path, group_size=32))
    with pytest.raises(UserError, match=r"--scale_init gptq conflicts"):
        parse_train_args(train_argv(tmp_path / "o", bits=None, quant_config=path, scale_init="gptq"))
    with pytest.raises(UserError, match="missing --w_bits"):
        parse_train_args(train_argv(tmp_path / "o", bits=None))


def test_resume_refuses_other_overrides(tmp_path):
    from paretoq.training.run import check_checkpoint_matches
    from paretoq.training.args import parse_train_args

    ck = tmp_path / "checkpoint-2"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"quantization_config": QuantConfig(w_bits=3).to_dict()}))
    path = tmp_path / "q.yaml"
    path.write_text(quant_config_yaml(QuantConfig(w_bits=3, overrides=[("q_proj", 4)])))
    cfg = parse_train_args(train_argv(tmp_path / "o", bits=None, quant_config=path))
    with pytest.raises(UserError, match=r"trained with w_bits=3 group_size=None, but this run asks for w_bits=3 "
                                        r"group_size=None and 1 per-layer override\(s\)"):
        check_checkpoint_matches(str(ck), cfg)


def test_allocation_config_uses_the_most_common_choice_as_default():
    from paretoq.allocate import Allocation, Sensitivity

    sens = Sensitivity(["a.0.x", "a.1.x", "a.2.x"], [(4, 8), (4, 8), (8, 8)], [Candidate(2), Candidate(4)],
                       [[1, 0], [1, 0], [1, 0]], [[0, 0]] * 3, 10, "reference", 1.0, 0.0)
    alloc = Allocation([1, 1, 0], 2.0, 0, 0, True, 2.0, 1)
    c = allocation_config(sens, alloc)
    # 2-bit covers 64 weights, 4-bit 64 too: the tie goes to fewer bits
    assert c.w_bits == 2 and [o.pattern for o in c.overrides] == [r"^a\.0\.x$", r"^a\.1\.x$"]
    assert [c.for_layer(n).w_bits for n in sens.layers] == [4, 4, 2]


def test_estimates():
    from paretoq.allocate import Sensitivity, predicted

    sens = Sensitivity(["a"], [(2, 2)], [Candidate(2), Candidate(4)], [[0.5, 0.1]], [[-0.2, 0.05]], 10, "reference",
                       1.0, 0.0)
    # default "clipped": a first-order gain (-0.2) is not credited, a first-order cost (0.05) is
    assert predicted(sens) == [[0.5, pytest.approx(0.15)]]
    assert predicted(sens, "fisher") == [[0.5, 0.1]]
    assert predicted(sens, "taylor") == [[pytest.approx(0.3), pytest.approx(0.15)]]
    with pytest.raises(UserError, match="--estimate 'hessian' is unknown"):
        predicted(sens, "hessian")


def test_unavailable_candidates_are_never_chosen():
    """A loss of None = the candidate does not fit that layer: the optimum among the rest, its cost not counted
    in the cheapest choice (here the unavailable one is the cheapest and best of layer 0)."""
    losses = [[None, 5.0, 1.0], [4.0, 2.0, 0.0]]
    costs = [[1, 4, 8], [2, 4, 8]]
    a = solve(losses, costs, 12)
    assert a.exact and a.choice == [2, 1] and a.loss == 3.0 and a.bytes == 12
    want = _brute([[1e9, 5.0, 1.0], [4.0, 2.0, 0.0]], costs, 12)
    assert a.loss == want[0]
    with pytest.raises(UserError, match="budget of 5 bytes is infeasible: .* already takes 6 bytes"):
        solve(losses, costs, 5)


def test_grouped_default_candidates_skip_layers_they_do_not_divide():
    """in_features 96: group 64 does not divide it, so only the per-row candidates are offered there."""
    from paretoq.allocate import DEFAULT_CANDIDATES, Sensitivity, allocate, available

    cands = parse_candidates(DEFAULT_CANDIDATES)
    assert [c.label for c in cands] == ["1.58", "2", "3", "4", "1.58:g64", "2:g64", "3:g64", "4:g64"]
    assert available(Candidate(2, 64), 128) and not available(Candidate(2, 64), 96) and available(Candidate(2), 96)
    # the grouped candidates look best everywhere; layer b (in 96) must still take a per-row one
    loss = [[8.0, 6.0, 4.0, 2.0, 0.1, 0.1, 0.1, 0.1]] * 2
    sens = Sensitivity(["a", "b"], [(8, 128), (8, 96)], cands, loss, [[0.0] * 8] * 2, 10, "reference", 1.0, 0.0)
    a = allocate(sens, 10_000)
    assert cands[a.choice[0]].group == 64 and cands[a.choice[1]] == Candidate(4)
    sens = Sensitivity(["b"], [(8, 96)], [Candidate(2, 64)], [[0.1]], [[0.0]], 10, "reference", 1.0, 0.0)
    with pytest.raises(UserError, match="no candidate fits b: every candidate's group size fails to divide its "
                                        "in_features 96; add a per-row candidate"):
        allocate(sens, 10_000)
    # the weights: None for a candidate the layer cannot take
    from torch import nn

    model = nn.Module()
    model.lin = nn.Linear(96, 8, bias=False)
    w = candidate_weights(model, ["lin"], [Candidate(2), Candidate(2, 64)])["lin"]
    assert w[0].shape == (8, 96) and w[1] is None
