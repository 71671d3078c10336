"""The one generation path on transformers, in-process on the tiny built-in Llama: greedy equals plain
``model.generate``, sampling is seeded, log-probs are the model's, stop strings and the end token end a completion,
and the measures the stages take (answer accuracy, decode timing) come from it. Its vLLM side runs in the GRPO
rollout test (tests/training/test_grpo.py) and the w8a8 gate on vLLM (tests/serving/test_vllm.py)."""

from __future__ import annotations

import pytest
import torch

from hone.generation import Sampling, TransformersGenerator, answer_accuracy, answer_matches, decode_ms_per_token

from tests.helpers import make_job

PROMPTS = ["The movie was", "A review: this film is"]


@pytest.fixture(scope="module")
def tiny():
    from hone.data import load_tokenizer
    from hone.modeling import load_base_model

    job = make_job()
    torch.manual_seed(0)
    return job, load_base_model(job).eval(), load_tokenizer(job)


def test_greedy_is_plain_generate_and_its_logprobs_are_the_model_s(tiny):
    _, model, tok = tiny
    gen = TransformersGenerator(model, tok, batch_size=1)
    outs = gen.generate(PROMPTS, Sampling(max_tokens=8, logprobs=0))
    for prompt, (out,) in zip(PROMPTS, outs):
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
        ref = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)[0, enc["input_ids"].shape[1]:]
        ref = ref.tolist()
        assert out.token_ids == ref[: len(out.token_ids)] and out.finish_reason in ("stop", "length")
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
        with torch.no_grad():
            logits = model(torch.tensor([enc["input_ids"][0].tolist() + out.token_ids])).logits[0].float().log_softmax(-1)
        start = enc["input_ids"].shape[1] - 1
        expected = [float(logits[start + k, t]) for k, t in enumerate(out.token_ids)]
        assert out.logprobs == pytest.approx(expected, abs=1e-3)
    # batched (left-padded) greedy gives the same completions as one at a time
    batched = TransformersGenerator(model, tok, batch_size=2).generate(PROMPTS, Sampling(max_tokens=8))
    assert [g[0].token_ids for g in batched] == [g[0].token_ids for g in outs]


def test_sampling_is_seeded_and_stops_where_asked(tiny):
    _, model, tok = tiny
    gen = TransformersGenerator(model, tok)
    s = Sampling(max_tokens=12, temperature=1.0, n=3, seed=7)
    a, b = gen.generate(PROMPTS[:1], s), gen.generate(PROMPTS[:1], s)
    assert len(a[0]) == 3 and [g.token_ids for g in a[0]] == [g.token_ids for g in b[0]]
    exact = gen.generate(PROMPTS[:1], Sampling(max_tokens=6, min_tokens=6))[0][0]
    assert len(exact.token_ids) == 6 and exact.finish_reason == "length"
    text = exact.text
    assert text.strip(), "six tokens of the tiny model decode to some text"
    stop = text.strip()[-2:]  # a stop string cuts the text where it first appears
    cut = gen.generate(PROMPTS[:1], Sampling(max_tokens=6, min_tokens=6, stop=(stop,)))[0][0]
    assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
    # a constraint holds on every sampled completion, batched and with several per prompt
    constrained = gen.generate(PROMPTS, Sampling(max_tokens=24, temperature=1.0, n=2, seed=3,
                                                 structured={"choice": ["positive", "negative"]}))
    assert {g.text for group in constrained for g in group} <= {"positive", "negative"}
    assert all(g.finish_reason == "stop" for group in constrained for g in group)
    numbers = gen.generate(PROMPTS[:1], Sampling(max_tokens=6, structured={"regex": "[0-9]{3}"}))[0][0]
    assert len(numbers.text) == 3 and numbers.text.isdigit()


def test_the_stage_measures(tiny):
    job, model, tok = tiny
    from hone.data import held_out_rows

    rows = list(held_out_rows(job.data, "validation", 4))
    gen = TransformersGenerator(model, tok)
    accuracy, results = answer_accuracy(gen, rows, job, tok, max_tokens=4)
    assert len(results) == 4 and accuracy == sum(r["correct"] for r in results) / 4
    assert [r["correct"] for r in results] == answer_matches([r["generated"] for r in results], [r["expected"] for r in results])
    assert answer_matches(["Positive, clearly.", "it is negative", "neutral"], ["positive", "negative", "positive"]) == [True, True, False]
    assert decode_ms_per_token(gen, new_tokens=4) > 0
