"""GPU quantisation (torchao int4/int8 weight-only, bitsandbytes 8/4-bit) and the vLLM engine."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.mark.parametrize("method", ["int8-weight-only", "int4-weight-only", "bnb-8bit", "bnb-4bit"])
def test_gpu_quantisation_methods_pass_the_gate_machinery(method, tmp_path):
    if method.startswith("bnb-") and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (pip install 'hone[gpu]')")
    from hone.quantize import load_quantized, quantize

    result = quantize("builtin:smollm2-135m-instruct", method, out=tmp_path / method, n=32, quiet=True)
    print(method, result.table())
    assert result.quantized["size_mb"] < result.original["size_mb"] or method.startswith("bnb-")
    assert result.quantized["eval_loss"] < result.original["eval_loss"] * 1.5
    model, tokenizer, info = load_quantized(result.artifact)
    assert info["method"] == method
    ids = tokenizer("The movie was", return_tensors="pt").to("cuda")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_vllm_engine_builds_a_serve_app():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (pip install 'hone[vllm]')")
    from hone.serving.app import build_app

    app = build_app({"config": {"model": "builtin:smollm2-135m-instruct", "engine": "vllm", "ray_actor_options": {"num_gpus": 1}}})
    assert app is not None
