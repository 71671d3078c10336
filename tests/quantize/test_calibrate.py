"""Calibrated W8A8 (hone.quantize.calibrate) against the papers' definitions, on small tensors and a tiny Llama with
planted activation outliers; no Ray, no vLLM."""

from __future__ import annotations

import copy

import pytest
import torch

from hone.quantize.calibrate import calibrate_w8a8, gptq_quantize, smooth_scales
from hone.quantized import int8_channel, int8_token


def _rtn_error(x, w, q, scale):
    return float((x @ w.t() - x @ (q.float() * scale).t()).pow(2).sum())


def test_gptq_is_round_to_nearest_with_a_diagonal_hessian_and_beats_it_on_correlated_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    q_rtn, s_rtn = int8_channel(w)
    q, s = gptq_quantize(w, torch.diag(torch.rand(64, generator=g) + 0.5), damp=0.0)
    assert torch.equal(q, q_rtn) and torch.allclose(s, s_rtn)  # no error to spread when inputs are uncorrelated
    # correlated inputs (a low-rank mix plus noise): GPTQ's objective ||X W^T - X Q^T||² is lower than rounding's
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.05 * torch.randn(512, 64, generator=g)
    q, s = gptq_quantize(w, x.t() @ x)
    assert torch.allclose(s, s_rtn)  # the same grid: one absmax scale per output channel
    assert _rtn_error(x, w, q, s) < 0.5 * _rtn_error(x, w, q_rtn, s_rtn)


def test_smoothquant_scales_follow_the_paper():
    act = torch.tensor([8.0, 1.0, 0.0, 2.0])
    wt = torch.tensor([0.5, 2.0, 1.0, 1.0])
    s = smooth_scales(act, wt, 0.5)
    assert torch.allclose(s[[0, 1, 3]], (act.pow(0.5) / wt.pow(0.5))[[0, 1, 3]])  # s_j = max|X_j|^α / max|W_j|^(1-α)
    assert s[2] == 1.0  # a channel never active is left alone


@pytest.fixture(scope="module")
def outlier_llama():
    """A 2-layer Llama whose norms feed two channels ~40x larger than the rest, as LLM activations have."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40
            layer.post_attention_layernorm.weight[[5]] *= 40
    return model


def _w8a8(model, rounded=None):
    """``model`` as vLLM computes W8A8: int8 weights per channel, int8 activations per token."""
    model = copy.deepcopy(model)
    named = dict(model.named_modules())
    for name, module in named.items():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            q, s = rounded[name] if rounded else int8_channel(module.weight.detach())
            module.weight.data = q.float() * s
            module.register_forward_pre_hook(lambda _m, a: (int8_token(a[0]), *a[1:]))
    return model


def test_calibrated_w8a8_keeps_the_function_and_cuts_the_int8_error(outlier_llama):
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randint(0, 256, (1, 48), generator=g) for _ in range(16)]
    held_out = torch.randint(0, 256, (4, 48), generator=g)
    modules = [n for n, m in outlier_llama.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        reference = outlier_llama(input_ids=held_out).logits
        plain = _w8a8(outlier_llama)(input_ids=held_out).logits
        smoothed = copy.deepcopy(outlier_llama)
        rounded, report = calibrate_w8a8(smoothed, modules, calibration)
        # smoothing moved scale between norms and weights: in full precision the function is the same
        assert torch.allclose(smoothed(input_ids=held_out).logits, reference, atol=1e-4)
        calibrated = _w8a8(smoothed, rounded)(input_ids=held_out).logits
    assert set(rounded) == set(modules) and report.rows == 16 and report.tokens == 16 * 48
    assert any(alpha is not None for alpha in report.alphas.values()), report.alphas  # the outliers were smoothed
    plain_err = float((plain - reference).pow(2).mean())
    calibrated_err = float((calibrated - reference).pow(2).mean())
    # held-out tokens, not the calibration ones: stated bound, under half the plain rounding's logit error
    assert calibrated_err < 0.5 * plain_err, (calibrated_err, plain_err)
