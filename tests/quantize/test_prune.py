"""Structured MLP-channel pruning (:mod:`hone.quantize.prune`) on the tiny Llama: a standard config that transformers
reloads, fewer parameters, the channels that matter kept."""

from __future__ import annotations

import pytest
import torch

from hone.quantize.prune import channel_scores, kept_channels, prune_mlp_channels


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
