"""The serving engine in-process (no Ray): requests that arrive while a batch decodes join it between
steps (continuous batching), and every request still gets exactly its one-at-a-time greedy output."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def engine():
    from hone.config import validate_serve_config
    from hone.serving.engine import Engine
    from hone.serving.spec import resolve

    return Engine(resolve(validate_serve_config({"model": "builtin:tiny-llama", "served_model_name": "tiny", "device": "cpu",
                                                 "max_loaded_adapters": 1})))


def _run(engine, reqs, admit=None, max_batch=None):
    texts = {}
    finished = {}
    steps = {}

    def emit(i, text, finish, n):
        texts[i] = texts.get(i, "") + text
        steps[i] = n
        if finish:
            finished[i] = finish

    engine.generate_batch(reqs, emit, admit, max_batch)
    return texts, finished


def _req(engine, prompt, n):
    from hone.generation import Sampling
    from hone.serving.engine import GenRequest

    return GenRequest(engine.encode_prompt(prompt, None), Sampling(max_tokens=n, temperature=0.0))


PROMPTS = ["The movie was", "A slow, dull film about", "Brilliant acting and a sharp script make this", "Not"]


def test_requests_join_a_running_batch_and_match_solo_greedy(engine):
    solo = {p: _run(engine, [_req(engine, p, 16)])[0][0] for p in PROMPTS}
    # A long-running pair is decoding; two more arrive at the 3rd and 6th step (different prompt lengths).
    arrivals = {3: [_req(engine, PROMPTS[2], 16)], 6: [_req(engine, PROMPTS[3], 16)]}
    calls = {"n": 0, "free": []}

    def admit(free):
        calls["n"] += 1
        calls["free"].append(free)
        return arrivals.pop(calls["n"], [])

    texts, finished = _run(engine, [_req(engine, PROMPTS[0], 16), _req(engine, PROMPTS[1], 16)], admit, max_batch=4)
    assert not arrivals, "the engine stopped asking for new requests before they arrived"
    assert [texts[i] for i in range(4)] == [solo[p] for p in PROMPTS]
    assert set(finished) == {0, 1, 2, 3}
    assert calls["free"][0] == 2 and min(calls["free"]) >= 0


def test_full_batch_admits_nothing(engine):
    asked = []
    _run(engine, [_req(engine, p, 4) for p in PROMPTS[:2]], lambda free: asked.append(free) or [], max_batch=2)
    assert asked == []  # no free row: the engine never asks


def test_constrained_requests_only_produce_their_grammar(engine):
    """Structured outputs on hone's engine (xgrammar): a choice, a regex and a JSON schema, greedy and sampled, in
    one batch with an unconstrained request, which still gets its solo greedy text."""
    import json

    from hone.generation import Sampling
    from hone.serving.engine import GenRequest
    from hone.serving.protocol import RequestError

    free = _run(engine, [_req(engine, PROMPTS[0], 12)])[0][0]
    ids = engine.encode_prompt(PROMPTS[1], None)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    constraints = [{"choice": ["positive", "negative", "mixed \"ok\""]}, {"regex": "[0-9]{3}"}, {"json": schema}, {"choice": ["yes", "no"]}]
    reqs = [GenRequest(ids, Sampling(max_tokens=40, temperature=t, seed=s), grammar=engine.compile_constraint(c))
            for c in constraints for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    texts, finished = _run(engine, [_req(engine, PROMPTS[0], 12), *reqs])
    assert texts[0] == free
    for k, c in enumerate(constraints):
        for j in range(3):
            text, i = texts[1 + 3 * k + j], 1 + 3 * k + j
            assert finished[i] == "stop", (c, text)
            if "choice" in c:
                assert text in c["choice"], text
            elif "regex" in c:
                assert len(text) == 3 and text.isdigit(), text
            else:
                assert json.loads(text) in ({"ok": True}, {"ok": False}), text
    for bad in ({"json": {"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}}, {"regex": "([a-z"}):
        with pytest.raises(RequestError, match="could not be compiled"):
            engine.compile_constraint(bad)
