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


def test_vllm_engine_on_cuda_behind_hones_ingress(tmp_path):
    """engine: vllm on a GPU: CUDA vLLM in the replica (its environment: HONE_VLLM_PYTHON, with the official vllm),
    hone's ingress in front; greedy text and a constrained choice."""
    import subprocess
    import sys

    from hone.runtime import vllm_python

    try:
        python = vllm_python() or sys.executable
    except RuntimeError as e:
        pytest.skip(str(e))
    probe = subprocess.run([python, "-c", "import importlib.metadata as m; m.version('vllm')"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} has vLLM's CPU build, not CUDA vLLM: point HONE_VLLM_PYTHON at an environment with 'vllm'")
    import openai

    from tests.helpers import free_port, start_server, stop_server

    cfg = {"name": "gpu-vllm", "model": "builtin:smollm2-135m-instruct", "served_model_name": "smollm2", "engine": "vllm",
           "port": free_port(), "metrics_export_port": free_port(), "num_replicas": 1, "max_ongoing_requests": 64,
           "ray_actor_options": {"num_gpus": 1, "num_cpus": 1}}
    proc, info = start_server(cfg, tmp_path)
    try:
        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert "Paris" in out.choices[0].text
        labels = ["positive", "negative"]
        choice = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Great film!"}], max_tokens=4,
                                                extra_body={"structured_outputs": {"choice": labels}})
        assert choice.choices[0].message.content in labels
    finally:
        stop_server(proc)
