"""Scale initialisation by search (``paretoq.quant.scale_init``): known optima, never worse than the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from paretoq import QuantConfig, QuantLinear, quantize_model
from paretoq.quant import SCHEMES, QuantConfigError
from paretoq.quant.functional import init_scale
from paretoq.quant.scale_init import (COARSE_RATIOS, MAX_RATIO, error_feedback_weights, input_second_moments,
                                input_statistics, quantization_error, search_scale)

BITS = [1, 1.58, 2, 3, 4]


def _outlier_weight(rows: int = 4, cols: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian rows whose column 0 holds a 10× outlier; h = E[x²] is ~0 on that column, 1 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.1
    w[:, 0] = 1.0  # the outlier dictates max|W| for every row
    h = torch.ones(cols)
    h[0] = 1e-8
    return w, h


def test_mse_act_clips_a_dead_outlier_column_and_mse_keeps_it():
    w, h = _outlier_weight()
    scheme = SCHEMES[4]
    ref = init_scale(w, scheme, None)  # max|W| / 7 = 1/7: the grid is stretched by the outlier
    mse = search_scale(w, scheme, None)
    act = search_scale(w, scheme, None, importance=h)
    # plain MSE must still represent the outlier: its scale stays close to the reference
    # (clipping a 1.0 weight costs far more than the rounding it saves)
    assert torch.all(mse / ref > 0.85)
    # activation-weighted: the outlier carries no signal, so the grid shrinks to fit the Gaussian
    # bulk (max ≈ 0.25 → α ≈ 0.25/7 or less), i.e. well below 0.4 of the reference
    assert torch.all(act / ref < 0.4)
    q_act = (w / act.clamp_min(1e-5)).round().clamp(-8, 7) * act
    assert torch.all(q_act[:, 0] < 0.5)  # the outlier is clipped
    # and each objective is minimised by its own search
    assert torch.all(quantization_error(w, act, scheme, None, h) < quantization_error(w, mse, scheme, None, h))
    assert torch.all(quantization_error(w, mse, scheme, None) <= quantization_error(w, act, scheme, None))


def test_binary_mse_optimum_is_the_weighted_mean_abs():
    # for q = sign, E(α) = Σ h (|w| − α)² is minimised at α* = Σ h|w| / Σ h; the reference init
    # (mean|w|) is optimal for h ≡ 1, and the search lands within the refinement step otherwise
    w = torch.tensor([[0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]])
    h = torch.tensor([1.0, 1, 1, 1, 1, 1, 8, 8])
    scheme = SCHEMES[1]
    assert torch.allclose(search_scale(w, scheme, None), w.abs().mean(-1, keepdim=True))
    best = (h * w.abs()).sum() / h.sum()
    got = search_scale(w, scheme, None, importance=h)
    assert abs(got.item() - best.item()) <= 0.0025 * w.abs().mean().item() + 1e-7


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [None, 16])
@pytest.mark.parametrize("weighted", [False, True])
def test_search_never_worse_than_reference_and_on_the_grid(bits, group_size, weighted):
    g = torch.Generator().manual_seed(int(bits * 100) + (group_size or 0))
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    w[3, 5] = 4.0  # one outlier
    h = torch.rand(64, generator=g) ** 4 if weighted else None
    scheme = SCHEMES[bits]
    ref = init_scale(w, scheme, group_size)
    found = search_scale(w, scheme, group_size, importance=h)
    assert found.shape == ref.shape
    e_ref = quantization_error(w, ref, scheme, group_size, h)
    e_found = quantization_error(w, found, scheme, group_size, h)
    assert torch.all(e_found <= e_ref)
    if weighted or bits != 1:  # (plain MSE at 1 bit: the reference mean|W| is already the optimum)
        assert e_found.sum() < 0.99 * e_ref.sum()  # and it does find something better on random weights
    # every ratio lies in the searched range: the coarse grid (walked on up to MAX_RATIO) ± one step
    ratio = found / ref
    step = COARSE_RATIOS[1] - COARSE_RATIOS[0]
    assert ratio.min() >= COARSE_RATIOS[0] - step - 1e-4 and ratio.max() <= MAX_RATIO + step + 1e-4


def test_search_is_exactly_the_coarse_grid_without_refinement():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    scheme = SCHEMES[3]
    ref = init_scale(w, scheme, None)
    found = search_scale(w, scheme, None, refine_points=0)
    ratio = (found / ref).flatten()
    grid = torch.tensor(COARSE_RATIOS + (1.0,))
    assert all(torch.isclose(grid, r, atol=1e-6).any() for r in ratio)


def test_row_chunks_do_not_change_the_result():
    w = torch.randn(40, 32, generator=torch.Generator().manual_seed(5))
    scheme = SCHEMES[2]
    a = search_scale(w, scheme, 8)
    b = search_scale(w, scheme, 8, row_chunk_elements=32 * 3)  # 3 rows per chunk
    assert torch.equal(a, b)


def test_input_second_moments_match_a_hand_computation():
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    q = model.model.layers[0].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.setdefault(k, []).append(args[0]))
             for k, m in (("q", q), ("down", down))]
    with torch.no_grad():
        model(input_ids=ids)
    for hd in hooks:
        hd.remove()
    model.train()
    stats = input_second_moments(model, {"q": q, "down": down}, ids, batch_size=2)
    assert model.training  # mode restored
    for k in ("q", "down"):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[k]])
        assert torch.allclose(stats[k], x.square().mean(0), rtol=1e-5, atol=1e-7)


def test_quantize_model_with_calibration_data():
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    base = tiny_llama()
    with torch.no_grad():
        base(input_ids=ids)  # the tiny model is deterministic
    errs = {}
    for init in ("reference", "mse", "mse_act"):
        model = tiny_llama()
        quantize_model(model, QuantConfig(w_bits=2, group_size=16, scale_init=init), calibration_data=ids)
        layer = model.model.layers[1].mlp.up_proj
        assert isinstance(layer, QuantLinear)
        errs[init] = quantization_error(layer.weight, layer.weight_clip_val, layer.scheme, 16).sum().item()
        assert model.config.quantization_config["scale_init"] == init
    assert errs["mse"] < errs["reference"]
    assert errs["mse"] <= errs["mse_act"]  # plain MSE is the optimum of the unweighted objective


def test_mse_act_without_calibration_data_says_the_fix():
    model = tiny_llama()
    with pytest.raises(QuantConfigError, match="calibration data.*--calibration_samples"):
        quantize_model(model, QuantConfig(w_bits=4, scale_init="mse_act"))
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    # loading from a checkpoint (init_scales=False) needs no calibration
    quantize_model(model, QuantConfig(w_bits=4, scale_init="mse_act"), init_scales=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)


def test_unknown_scale_init_lists_the_choices():
    with pytest.raises(QuantConfigError, match="reference, mse, mse_act, gptq"):
        QuantConfig(w_bits=2, scale_init="gptq-ish")


def test_mse_act_improves_layer_output_error_on_a_real_like_layer():
    """The objective is a proxy of ‖(W − Ŵ)x‖²: check the real output error drops too."""
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(32, 64, generator=g) * 0.05)
        lin.weight[:, 7] *= 20  # outlier input channel in the weight ...
    x = torch.randn(512, 64, generator=g)
    x[:, 7] *= 0.01  # ... that carries almost no signal
    h = x.square().mean(0)
    scheme = SCHEMES[3]
    out = {}
    candidates = (("ref", init_scale(lin.weight, scheme, None)), ("act", search_scale(lin.weight, scheme, None, h)))
    for name, alpha in candidates:
        w_hat = (lin.weight / alpha).round().clamp(-4, 3) * alpha
        out[name] = ((x @ (lin.weight - w_hat).T) ** 2).mean().item()
    assert out["act"] < 0.5 * out["ref"]


def _correlated_layer(seed=11, m=24, n=64, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    mix = 2 * torch.randn(n, n, generator=g) / n**0.5 + torch.eye(n)
    x = torch.randn(tokens, n, generator=g) @ mix  # correlated input channels
    w = torch.randn(m, n, generator=g) * 0.05
    return w, x


@pytest.mark.parametrize("bits, group_size", [(2, 16), (3, None), (4, None), (1.58, 32), (1, None)])
def test_error_feedback_lowers_the_output_error_and_keeps_latents_in_range(bits, group_size):
    w, x = _correlated_layer()
    scheme = SCHEMES[bits]
    hessian = x.T @ x / len(x)
    alpha = search_scale(w, scheme, group_size, torch.diagonal(hessian))
    latent = error_feedback_weights(w, alpha, scheme, group_size, hessian)

    def w_hat(weights):
        g = weights.shape[1] if group_size is None else group_size
        a = alpha.clamp_min(1e-5).repeat_interleave(g, dim=1)
        return scheme.quantize(weights / a) * a

    rtn = ((x @ (w - w_hat(w)).T) ** 2).mean()
    fed = ((x @ (w - w_hat(latent)).T) ** 2).mean()
    assert fed < 0.9 * rtn
    g = w.shape[1] if group_size is None else group_size
    a = alpha.clamp_min(1e-5).repeat_interleave(g, dim=1)
    assert torch.all(latent >= a * scheme.lo - 1e-6) and torch.all(latent <= a * scheme.hi + 1e-6)


def test_quantize_model_gptq_rewrites_weights_and_beats_mse_act_on_the_output():
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))
    fp = tiny_llama()
    with torch.no_grad():
        ref_logits = fp(input_ids=ids).logits
    errs = {}
    for init in ("mse_act", "gptq"):
        model = tiny_llama()
        w0 = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        quantize_model(model, QuantConfig(w_bits=3, scale_init=init), calibration_data=ids)
        moved = not torch.equal(model.model.layers[0].mlp.up_proj.weight.detach(), w0)
        assert moved == (init == "gptq")
        with torch.no_grad():
            errs[init] = (model(input_ids=ids).logits - ref_logits).square().mean().item()
    assert errs["gptq"] < errs["mse_act"]
    with pytest.raises(QuantConfigError, match="'gptq' needs calibration data"):
        quantize_model(tiny_llama(), QuantConfig(w_bits=3, scale_init="gptq"))


def test_full_statistics_are_shared_by_siblings_and_match_a_hand_computation():
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    attn = model.model.layers[0].self_attn
    mods = {"model.layers.0.self_attn.q_proj": attn.q_proj, "model.layers.0.self_attn.k_proj": attn.k_proj,
            "model.layers.0.self_attn.o_proj": attn.o_proj}
    seen = []
    hd = attn.q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, 32)))
    with torch.no_grad():
        model(input_ids=ids)
    hd.remove()
    stats = input_statistics(model, mods, ids, batch_size=2, full=True)
    q, k, o = stats.values()
    assert q is k and q is not o  # q and k read the same tensor: one accumulator
    x = torch.cat(seen)
    assert torch.allclose(q, x.T @ x / len(x), rtol=1e-4, atol=1e-6)
    assert torch.allclose(torch.diagonal(q), input_second_moments(model, mods, ids)["model.layers.0.self_attn.q_proj"],
                          rtol=1e-4, atol=1e-6)


def test_statistics_stay_fp32_under_autocast():
    """Mid-training the forward runs under bf16 autocast: E[x xᵀ] must still be accumulated in fp32."""
    model = tiny_llama(layers=1, hidden=32, vocab=64)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    down = model.model.layers[0].mlp.down_proj
    seen = []
    hd = down.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
        stats = input_statistics(model, {"down": down}, ids, batch_size=4, full=True)
    hd.remove()
    x = seen[0].float()
    assert torch.allclose(stats["down"], x.T @ x / len(x), rtol=1e-5, atol=1e-7)
    torch.linalg.cholesky(stats["down"] + 1e-3 * torch.eye(len(x.T)) * stats["down"].diagonal().mean())
