"""Structured MLP-channel pruning (:mod:`hone.quantize.prune`) on the tiny Llama: a standard config that transformers
reloads, fewer parameters, the channels that matter kept; ``hone prune`` gates the result and records the verdict (the
pipeline's prune stage, with vLLM loading the pruned model and a recovery run, is in tests/pipeline/test_pipeline.py)."""

from __future__ import annotations

import json

import pytest
import torch

from hone.quantize.prune import channel_scores, kept_channels, kept_layers, layer_scores, prune_layers, prune_mlp_channels

from tests.helpers import hone


@pytest.fixture
def tiny_model():
    from transformers import AutoModelForCausalLM

    from hone import assets

    return AutoModelForCausalLM.from_pretrained(assets.resolve_model("builtin:tiny-llama")).eval()


def _batches(n: int = 4, length: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 200, (1, length), generator=g) for _ in range(n)]


def test_pruned_model_is_a_smaller_standard_config_that_reloads(tiny_model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    width = tiny_model.config.intermediate_size
    keep = kept_channels(width, 0.5, multiple=8)
    stats = prune_mlp_channels(tiny_model, channel_scores(tiny_model, _batches()), keep)
    assert stats.intermediate_after == keep == width // 2 and 0 < stats.fewer_params < 0.5
    tiny_model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).intermediate_size == keep  # what vLLM reads as well
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sum(p.numel() for p in reloaded.parameters()) == stats.params_after
    ids = _batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, tiny_model(ids).logits, atol=1e-5)


def test_layer_pruning_removes_the_layer_that_changes_least_and_the_cache_follows(tiny_model, tmp_path):
    """A layer whose attention and MLP write nothing (their output projections zeroed) leaves its input as it is: Block
    Influence 0, the layer removed; the smaller config reloads, and greedy decoding with the KV cache (whose layer
    indices were renumbered) matches decoding without it."""
    from transformers import AutoModelForCausalLM

    n = tiny_model.config.num_hidden_layers
    assert n >= 2
    with torch.no_grad():
        tiny_model.model.layers[1].self_attn.o_proj.weight.zero_()
        tiny_model.model.layers[1].mlp.down_proj.weight.zero_()
    scores = layer_scores(tiny_model, _batches())
    assert scores[1] < 1e-9 < min(s for i, s in enumerate(scores) if i != 1)
    stats = prune_layers(tiny_model, scores, kept_layers(n, 1 / n))
    assert stats.removed_layers == [1] and tiny_model.config.num_hidden_layers == stats.layers_after == n - 1
    tiny_model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _batches(1, 8)[0]
    with torch.no_grad():
        for model in (tiny_model, reloaded):  # in memory (renumbered) and as loaded
            cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
            assert torch.equal(cached, model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False))
        assert torch.equal(tiny_model(ids).logits, reloaded(ids).logits)
    assert sum(p.numel() for p in reloaded.parameters()) == stats.params_after


def test_the_channels_that_carry_the_output_are_kept(tiny_model):
    """A channel whose down_proj column is zero contributes nothing: it scores 0 and is the one cut when a layer keeps
    all but one, which leaves the model's output unchanged; sparsity 0 keeps every channel."""
    width = tiny_model.config.intermediate_size
    with torch.no_grad():
        for layer in tiny_model.model.layers:
            layer.mlp.down_proj.weight[:, 5] = 0.0
    ids = _batches(1)[0]
    with torch.no_grad():
        before = tiny_model(ids).logits
    scores = channel_scores(tiny_model, _batches())
    for s in scores:
        assert s[5] == 0 and int((s > 0).sum()) == width - 1
    assert kept_channels(width, 0.0) == width
    prune_mlp_channels(tiny_model, scores, width - 1)
    with torch.no_grad():
        assert torch.allclose(tiny_model(ids).logits, before, atol=1e-5)
    assert tiny_model.config.intermediate_size == width - 1


def test_sparsity_outside_its_range_is_refused():
    from hone.config import QuantizeError

    with pytest.raises(QuantizeError, match="sparsity"):
        kept_channels(1536, 1.0)
    assert kept_channels(1536, 0.4) == 928 and kept_channels(1536, 0.25) == 1152


def test_hone_prune_records_a_failed_gate_and_replaces_only_its_own(tmp_path):
    """A gate the pruned model cannot pass (the loss must fall by half): exit 3, the verdict in its hone.json, the model a
    smaller standard config; a folder hone did not make is never written over."""
    from transformers import AutoConfig

    from hone.config import QuantizeError
    from hone.quantize import prune

    out = tmp_path / "pruned"
    run = hone("prune", "builtin:tiny-llama", "--sparsity", "0.5", "-n", "8", "--engine", "transformers", "--calibration-rows", "8",
               "--max-loss-increase", "-0.5", "--out", str(out), env={"HONE_HOME": str(tmp_path / "home")}, timeout=300)
    assert run.returncode == 3, run.stdout[-3000:] + run.stderr[-3000:]
    assert "quality gate FAILED" in run.stdout and "eval loss" in run.stdout
    record = json.loads((out / "hone.json").read_text())["pruned"]
    assert record["gate"]["passed"] is False and record["gate"]["engine"] == "transformers"
    assert record["intermediate_after"] == AutoConfig.from_pretrained(out).intermediate_size == record["intermediate_before"] // 2
    assert record["gate"]["pruned"]["params_m"] < record["gate"]["original"]["params_m"]
    assert record["gate"]["pruned"]["decode_ms_per_token"] > 0 and record["gate"]["original"]["eval_loss"] > 0
    # hone serve refuses it before any Ray work, unless told to serve it anyway
    from hone.config import validate_serve_config
    from hone.serving.spec import ServeError, resolve

    with pytest.raises(ServeError, match="pruned model whose quality gate failed .*serve the unpruned builtin:tiny-llama"):
        resolve(validate_serve_config({"model": str(out), "engine": "transformers"}))
    assert resolve(validate_serve_config({"model": str(out), "engine": "transformers", "allow_failed_gate": True})).path == str(out)

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(QuantizeError, match="not a model hone pruned"):
        prune("builtin:tiny-llama", 0.5, out=mine, quiet=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(QuantizeError, match="sparsity"):
        prune("builtin:tiny-llama", 1.0, out=tmp_path / "never", quiet=True)
    assert not (tmp_path / "never").exists()
