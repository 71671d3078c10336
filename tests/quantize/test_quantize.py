"""hone quantize: real torch/torchao quantisation, the quality gate, the registry verdict, serve's refusal."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import hone, make_job


@pytest.fixture()
def registered_export(home, tmp_path):
    """A full-model export of the tiny Llama in hone's export format, registered as models:/tiny@winner."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets, registry

    export = tmp_path / "export"
    path = assets.resolve_model("builtin:tiny-llama")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(export)
    AutoTokenizer.from_pretrained(path).save_pretrained(export)
    job = make_job(method="full")
    (export / "hone.json").write_text(json.dumps({"kind": "model", "job": job.to_dict()}))
    with registry._client() as client:
        exp = registry._experiment(client, "quantize-test")
        run = client.create_run(exp)
        client.set_terminated(run.info.run_id)
    registry.register_winner("tiny", run.info.run_id, export, "eval_loss", 1.0)
    return export


def test_int8_gate_passes_and_is_recorded(registered_export, home):
    from hone import registry
    from hone.quantize import load_quantized, quantize

    result = quantize("models:/tiny@winner", "int8-dynamic", n=16, quiet=True)
    assert result.passed, result.table()
    assert result.quantized["size_mb"] < result.original["size_mb"]
    for key in ("eval_loss", "peak_rss_mb", "decode_ms_per_token"):
        assert result.original[key] > 0 and result.quantized[key] > 0
    assert abs(result.quantized["eval_loss"] - result.original["eval_loss"]) / result.original["eval_loss"] < 0.01
    tags = registry.resolve_model_ref("models:/tiny@winner")["tags"]
    assert tags["hone.quantized.int8-dynamic.gate"] == "passed"
    assert Path(tags["hone.quantized.int8-dynamic"]) == result.artifact
    model, _, info = load_quantized(result.artifact)
    import torch

    assert any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules())
    assert info["gate"]["passed"] is True

    from hone.config import validate_serve_config
    from hone.serving.spec import resolve

    spec = resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-dynamic"}))
    assert spec.kind == "quantized" and spec.path == str(result.artifact)


def test_artifacts_load_without_pickle_and_only_as_recorded(registered_export, home, tmp_path):
    """A quantised artifact loads with torch.load(weights_only=True) and only if its weights hash to what was recorded;
    through the registry, only from hone's artifact store and only the content the registry recorded."""
    import shutil

    import torch

    from hone import registry
    from hone.config import validate_serve_config
    from hone.quantize import QuantizeError, load_quantized, quantize
    from hone.serving.spec import ServeError, resolve

    result = quantize("models:/tiny@winner", "int8-dynamic", n=4, quiet=True)
    info = json.loads((result.artifact / "quantization.json").read_text())
    assert len(info["sha256"]) == 64
    assert registry.resolve_model_ref("models:/tiny@winner")["tags"]["hone.quantized.int8-dynamic.sha256"] == info["sha256"]

    class Payload:  # a pickle that would run code when loaded with weights_only=False
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil"
    shutil.copytree(result.artifact, evil)
    torch.save({"x": Payload()}, evil / "quantized.pt")
    with pytest.raises(QuantizeError, match="weights changed since they were quantised"):
        load_quantized(evil)
    from hone.quantized import artifact_digest

    forged = {**info, "sha256": artifact_digest(evil)}  # a forged record does not make the pickle run either
    (evil / "quantization.json").write_text(json.dumps(forged))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_quantized(evil)
    assert not (tmp_path / "pwned").exists()

    # a registry tag pointing outside the artifact store, or at content other than recorded, is refused by serve
    reg = registry.resolve_model_ref("models:/tiny@winner")
    registry.tag_version("tiny", reg["version"], {"hone.quantized.int8-dynamic": str(evil)})
    with pytest.raises(ServeError, match="outside hone's artifact store"):
        resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-dynamic"}))
    registry.tag_version("tiny", reg["version"], {"hone.quantized.int8-dynamic": str(result.artifact),
                                                  "hone.quantized.int8-dynamic.sha256": "0" * 64})
    with pytest.raises(ServeError, match="not the one the registry recorded"):
        resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-dynamic"}))
    registry.tag_version("tiny", reg["version"], {"hone.quantized.int8-dynamic.sha256": info["sha256"]})
    assert resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-dynamic"})).kind == "quantized"


@pytest.mark.slow
def test_forced_gate_failure_is_marked_and_refused_by_serve(registered_export, home, tmp_path):
    env = {**os.environ, "HONE_HOME": str(home)}
    out = hone("quantize", "models:/tiny@winner", "--method", "int8-weight-only", "-n", "8", "--max-loss-increase", "-0.5", env=env)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "quality gate FAILED" in out.stdout
    from hone import registry

    assert registry.resolve_model_ref("models:/tiny@winner")["tags"]["hone.quantized.int8-weight-only.gate"] == "failed"
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text("model: models:/tiny@winner\nquantization: int8-weight-only\n")
    refused = hone("serve", str(serve_yaml), env=env, timeout=120)
    assert refused.returncode == 1 and "failed its quality gate" in refused.stderr and "--allow-failed-gate" in refused.stderr

    from hone.config import validate_serve_config
    from hone.serving.spec import resolve

    spec = resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-weight-only", "allow_failed_gate": True}))
    assert spec.gate is False


def test_missing_artifact_and_gpu_methods_fail_clearly(registered_export, home, tmp_path):
    import torch

    from hone.config import validate_serve_config
    from hone.quantize import QuantizeError, quantize
    from hone.serving.spec import ServeError, resolve

    with pytest.raises(ServeError, match="hone quantize models:/tiny@winner --method int8-dynamic"):
        resolve(validate_serve_config({"model": "models:/tiny@winner", "quantization": "int8-dynamic"}))
    if not torch.cuda.is_available():
        with pytest.raises(QuantizeError, match="needs a CUDA GPU"):
            quantize("builtin:tiny-llama", "int4-weight-only")
    with pytest.raises(QuantizeError, match="unknown quantisation method"):
        quantize("builtin:tiny-llama", "int3")
    # --out never replaces a folder hone did not make (it used to be renamed aside and deleted)
    mine = tmp_path / "my-models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(QuantizeError, match="is not a hone quantised artifact"):
        quantize("builtin:tiny-llama", "int8-dynamic", out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_gate_fails_on_non_finite_measures_and_refuses_no_rows():
    """A diverged model never passes: NaN compares as 'not worse than allowed', so it is checked on its own."""
    from hone.quantize import GateThresholds, QuantizeError, quantize
    from hone.quantize.gate import gate_verdict

    ok = {"eval_loss": 1.0, "answer_accuracy": 0.8, "size_mb": float("nan")}  # size: not measured for bitsandbytes
    assert gate_verdict("causal_lm", ok, dict(ok), GateThresholds())["passed"] is True
    for broken in ({**ok, "eval_loss": float("nan")}, {**ok, "eval_loss": float("inf")}, {**ok, "answer_accuracy": float("nan")}):
        verdict = gate_verdict("causal_lm", ok, broken, GateThresholds())
        assert verdict["passed"] is False and "non-finite" in verdict["rule"], verdict
        assert gate_verdict("causal_lm", broken, ok, GateThresholds())["passed"] is False
    cls = {"eval_loss": 0.5, "eval_accuracy": float("nan")}
    assert gate_verdict("sequence_classification", cls, {**cls, "eval_accuracy": 0.9}, GateThresholds())["passed"] is False
    with pytest.raises(QuantizeError, match="at least one evaluation row"):
        quantize("builtin:tiny-llama", "int8-dynamic", n=0)


def test_w8a8_artifact_is_vllms_format_and_loads_with_its_numerics(tmp_path):
    """w8a8-int8 writes compressed-tensors W8A8 (int8 weights, one scale per output channel, the scheme in config.json) that
    vLLM loads; the gate loads it back in torch with the same numerics (weights × scales, inputs rounded to int8 per token)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets
    from hone.quantized import artifact_digest, default_modules, load_quantized, save_quantized

    path = assets.resolve_model("builtin:tiny-llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    modules = default_modules(model, "w8a8-int8")
    save_quantized(model, tokenizer, "w8a8-int8", tmp_path, modules)
    state = load_file(tmp_path / "model.safetensors")
    first = f"{modules[0]}.weight"
    assert state[first].dtype == torch.int8 and state[first.removesuffix("weight") + "weight_scale"].shape == (state[first].shape[0], 1)
    assert "lm_head.weight" not in state or state["lm_head.weight"].dtype == torch.float32
    scheme = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert scheme["quant_method"] == "compressed-tensors" and scheme["format"] == "int-quantized"
    assert scheme["config_groups"]["group_0"]["input_activations"]["strategy"] == "token"
    (tmp_path / "quantization.json").write_text(json.dumps({"method": "w8a8-int8", "task": "causal_lm", "quantized_modules": modules,
                                                            "sha256": artifact_digest(tmp_path)}))
    loaded, _, _ = load_quantized(tmp_path)
    ids = tokenizer("The movie was", return_tensors="pt")
    with torch.no_grad():
        ref, out = model(**ids).logits, loaded(**ids).logits
    assert not torch.equal(ref, out) and torch.allclose(ref, out, atol=0.05 * ref.abs().max().item())
