"""Built-in models and data load offline (HF_HUB_OFFLINE=1 is set by conftest)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hone import assets


def test_offline_mode_is_on():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.suffix in (".json", ".safetensors")}


def test_tiny_llama_is_deterministic(tmp_path):
    """Two builds from scratch in separate homes give byte-identical tokenizer and weights."""
    code = "from hone import assets; print(assets.resolve_model('builtin:tiny-llama'))"
    dirs = []
    for home in ("a", "b"):
        env = {**os.environ, "HONE_HOME": str(tmp_path / home)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        dirs.append(Path(out.stdout.strip().splitlines()[-1]))
    a, b = (_digest(d) for d in dirs)
    assert "model.safetensors" in a and "tokenizer.json" in a
    assert a == b


def test_tiny_llama_loads_and_has_chat_template(tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.resolve_model("builtin:tiny-llama"))
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert tiny_tokenizer.chat_template and tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer("a fine film", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == len(tiny_tokenizer)


def test_materialise_is_atomic(tmp_path):
    """A build that fails leaves no directory behind, and the next call builds again."""
    target = tmp_path / "thing"

    def broken(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        assets._materialise(target, broken)
    assert not target.exists()
    assets._materialise(target, lambda out: (out / "whole").write_text("y"))
    assert (target / "whole").read_text() == "y" and (target / ".complete").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".thing-")]


@pytest.mark.slow
def test_smollm2_answers_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve_model("builtin:smollm2-135m-instruct")
    assert (Path(path) / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert tokenizer.chat_template
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][inputs["input_ids"].shape[1]:])


def test_minilm_loads_as_a_classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = assets.resolve_model("builtin:minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    logits = model(**tokenizer(["great", "awful"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 25e6


def test_rotten_tomatoes_cleaned_and_split():
    frame = assets._rotten_tomatoes_frame()
    assert frame["text"].str.len().min() > 0 and not frame["text"].duplicated().any()
    assert set(frame["label"]) == {0, 1}
    # 7,403 fresh + 5,405 rotten before dropping empty and duplicate texts.
    assert 12_600 < len(frame) <= 12_808
    cls = assets.load_builtin_dataset("builtin:rotten-tomatoes", "classification")
    assert cls["train"].features["label"].names == ["negative", "positive"]
    sizes = {k: len(v) for k, v in cls.items()}
    assert sum(sizes.values()) == len(frame) and sizes["validation"] == sizes["test"] == len(frame) // 10
    texts = [set(cls[k]["text"]) for k in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    view = assets.load_builtin_dataset("builtin:rotten-tomatoes", "alpaca")
    row = view["test"][0]
    assert row["instruction"] == assets.SENTIMENT_INSTRUCTION and row["output"] in ("positive", "negative")
    assert row["input"] == cls["test"][0]["text"]
    assert view["test"]["output"] == [["negative", "positive"][i] for i in cls["test"]["label"]]
    # the balanced variant: as many fresh as rotten training reviews (in the same order), the held-out splits unchanged
    balanced = assets.load_builtin_dataset("builtin:rotten-tomatoes-balanced", "classification")
    labels = balanced["train"]["label"]
    assert labels.count(0) == labels.count(1) == cls["train"]["label"].count(0) < cls["train"]["label"].count(1)
    kept = set(balanced["train"]["text"])
    assert [t for t in cls["train"]["text"] if t in kept] == balanced["train"]["text"]
    assert all(balanced[k]["text"] == cls[k]["text"] for k in ("validation", "test"))


def test_unknown_builtins_are_clear():
    with pytest.raises(ValueError, match="did you mean 'builtin:minilm'"):
        assets.resolve_model("builtin:minilmm")
    with pytest.raises(ValueError, match="classification.*alpaca"):
        assets.load_builtin_dataset("builtin:rotten-tomatoes", "sharegpt")


def test_hub_ids_pass_through_unchanged():
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
