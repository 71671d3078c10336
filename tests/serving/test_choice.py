"""engine: auto picks vLLM where the installed vLLM (its CPU build in .venv-vllm) supports the model, hone's engine
elsewhere, and says why; nothing here starts Ray (the choice is made before any Ray work)."""

from __future__ import annotations

import json
import sys

import pytest

from hone.artifacts import ModelSpec, resolve_ref
from hone.config import validate_serve_config
from hone.serving.choice import choose_engine, vllm_capabilities
from hone.serving.spec import ServeError, resolve


@pytest.fixture(scope="module")
def caps():
    """What the installed vLLM supports (asked once; cached under HONE_HOME/cache)."""
    from hone.runtime import vllm_python

    return vllm_capabilities(vllm_python())


def _model_folder(tmp_path, name: str, **config):
    """A folder with a tiny Llama's config.json (the choice reads only the config)."""
    from transformers import LlamaConfig

    folder = tmp_path / name
    LlamaConfig(**{"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 1,
                   "intermediate_size": 128, "vocab_size": 128, "architectures": ["LlamaForCausalLM"], **config}).save_pretrained(folder)
    return folder


def test_auto_serves_a_supported_model_on_vllm_and_says_why(caps):
    assert caps["device"] == "cpu" and 32 in caps["head_sizes"] and "LlamaForCausalLM" in caps["archs"]
    spec = resolve(validate_serve_config({"model": "builtin:tiny-llama"}))
    assert spec.engine == "vllm", spec.engine_reason
    assert f"vLLM {caps['version']}" in spec.engine_reason and "LlamaForCausalLM" in spec.engine_reason
    explicit = resolve(validate_serve_config({"model": "builtin:tiny-llama", "engine": "transformers"}))
    assert explicit.engine == "transformers" and "in the serve config" in explicit.engine_reason


def test_auto_keeps_hone_s_engine_where_vllm_cannot_serve_the_model(caps, tmp_path):
    cfg = validate_serve_config({"model": "builtin:tiny-llama"})
    head16 = _model_folder(tmp_path, "head16", hidden_size=32)  # 2 heads of 16: vLLM's CPU attention has no kernel
    choice = choose_engine(cfg, ModelSpec(str(head16), "model", str(head16), "causal_lm"), "none")
    assert choice.engine == "transformers" and "head size 16" in choice.reason, choice
    odd = _model_folder(tmp_path, "odd", architectures=["MadeUpForCausalLM"])
    choice = choose_engine(cfg, ModelSpec(str(odd), "model", str(odd), "causal_lm"), "none")
    assert choice.engine == "transformers" and "architecture MadeUpForCausalLM" in choice.reason, choice
    ok = _model_folder(tmp_path, "ok")
    assert choose_engine(cfg, ModelSpec(str(ok), "model", str(ok), "causal_lm"), "none").engine == "vllm"
    # a classifier, hone's torch-quantised formats, and hone-only settings: decided without asking vLLM
    classifier = resolve_ref("builtin:minilm")
    assert classifier.task == "sequence_classification"
    assert choose_engine(cfg, classifier, "none").engine == "transformers"
    choice = choose_engine(cfg, ModelSpec(str(ok), "quantized", str(ok), "causal_lm"), "int8-dynamic")
    assert choice.engine == "transformers" and "torch-quantised" in choice.reason
    waits = validate_serve_config({"model": "builtin:tiny-llama", "batch_wait_timeout_s": 0.01})
    assert choose_engine(waits, ModelSpec(str(ok), "model", str(ok), "causal_lm"), "none").engine == "transformers"
    # vLLM's own format needs vLLM: served there, or refused with the reason
    assert choose_engine(cfg, ModelSpec(str(ok), "quantized", str(ok), "causal_lm"), "w8a8-int8").engine == "vllm"
    with pytest.raises(ServeError, match="head size 16"):
        choose_engine(cfg, ModelSpec(str(head16), "quantized", str(head16), "causal_lm"), "w8a8-int8")


def test_auto_without_vllm_serves_on_hone_s_engine(tmp_path):
    """An environment without vLLM (hone's own, which make setup keeps free of it): hone's engine, and a vLLM format is
    refused with what to do."""
    ok = _model_folder(tmp_path, "ok")
    cfg = validate_serve_config({"model": str(ok), "vllm_python": sys.executable})
    choice = choose_engine(cfg, ModelSpec(str(ok), "model", str(ok), "causal_lm"), "none")
    assert choice.engine == "transformers" and "vLLM is not available" in choice.reason and "make setup" in choice.reason
    with pytest.raises(ServeError, match="vLLM's format"):
        choose_engine(cfg, ModelSpec(str(ok), "quantized", str(ok), "causal_lm"), "w8a8-int8")


def test_the_capability_cache_is_per_installed_vllm(caps):
    from hone import assets
    from hone.runtime import vllm_python

    entries = list((assets.hone_home() / "cache").glob("vllm-capabilities-*.json"))
    assert any(json.loads(e.read_text()) == caps for e in entries)
    assert vllm_capabilities(vllm_python()) == caps  # from the cache: the same answer
