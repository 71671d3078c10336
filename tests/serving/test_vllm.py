"""engine: vllm behind hone's ingress: real vLLM (its CPU build, in .venv-vllm) serving SmolLM2-135M, driven with the
openai client; one server for the module (vLLM's eager start takes about a minute here)."""

from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

import httpx
import pytest

from hone.config import ConfigError, validate_serve_config
from hone.serving.spec import ServeError

from tests.helpers import free_port, hone, malformed, metrics, start_server, stop_server

KEY = "sk-hone-vllm-test"
MODEL = "builtin:smollm2-135m-instruct"
NAME = "smollm2"
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn a language is"]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name", "age"],
          "additionalProperties": False}


# --------------------------------------------------------------------------- checks before any Ray work


def test_engine_vllm_settings_are_validated_before_serving():
    with pytest.raises(ConfigError, match="quantise with --method w8a8-int8"):
        validate_serve_config({"model": MODEL, "engine": "vllm", "quantization": "int8-dynamic"})
    with pytest.raises(ConfigError, match="vLLM's format: serve it with engine: vllm"):
        validate_serve_config({"model": MODEL, "engine": "transformers", "quantization": "w8a8-int8"})
    with pytest.raises(ConfigError, match="apply to engine: vllm"):
        validate_serve_config({"model": MODEL, "engine": "transformers", "vllm_engine_args": {"max_model_len": 512}})
    with pytest.raises(ConfigError, match="set by hone"):
        validate_serve_config({"model": MODEL, "engine": "vllm", "vllm_engine_args": {"model": "other"}})
    with pytest.raises(ConfigError, match="max_batch_size is vLLM's max_num_seqs"):
        validate_serve_config({"model": MODEL, "engine": "vllm", "max_batch_size": 4, "vllm_engine_args": {"max_num_seqs": 8}})
    with pytest.raises(ConfigError, match="batch_wait_timeout_s applies to engine: transformers"):
        validate_serve_config({"model": MODEL, "engine": "vllm", "batch_wait_timeout_s": 0.05})
    from hone.serving.vllm import vllm_python

    with pytest.raises(ServeError, match="no such interpreter"):
        vllm_python(validate_serve_config({"model": MODEL, "engine": "vllm", "vllm_python": "/nonexistent/python"}))


def test_a_classifier_or_a_quantised_artifact_is_refused_for_vllm():
    import dataclasses

    from hone.serving.spec import resolve
    from hone.serving.vllm import engine_args

    cfg = validate_serve_config({"model": MODEL, "engine": "vllm"})
    spec = dataclasses.replace(resolve(cfg), task="sequence_classification", source="a classifier")
    with pytest.raises(ServeError, match="causal LMs"):
        engine_args(cfg, spec)


def test_max_batch_size_is_vllm_s_max_num_seqs():
    """The one batch setting reaches either engine: vLLM gets it as max_num_seqs, or keeps its own default when unset."""
    from hone.serving.spec import resolve
    from hone.serving.vllm import engine_args

    for given, expected in ((None, None), (4, 4)):
        cfg = validate_serve_config({"model": MODEL, "engine": "vllm", **({"max_batch_size": given} if given else {})})
        assert engine_args(cfg, resolve(cfg))["args"].get("max_num_seqs") == expected
    cfg = validate_serve_config({"model": MODEL, "engine": "vllm", "vllm_engine_args": {"max_num_seqs": 16}})
    assert engine_args(cfg, resolve(cfg))["args"]["max_num_seqs"] == 16


def test_an_adapter_id_changes_with_its_content(tmp_path):
    """vLLM caches a LoRA (and its prefix-cache entries) by id: a replaced adapter must never reuse them."""
    from hone.serving.vllm import engine_args

    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (folder / "adapter_model.safetensors").write_bytes(b"one")
    cfg = validate_serve_config({"model": MODEL, "engine": "vllm", "adapters": {"a": str(folder)}})
    from hone.serving.spec import resolve

    spec = resolve(cfg)
    first = engine_args(cfg, spec)
    (folder / "adapter_model.safetensors").write_bytes(b"two")
    second = engine_args(cfg, spec)
    assert first["loras"]["a"]["id"] != second["loras"]["a"]["id"]
    assert first["args"]["enable_lora"] and first["args"]["max_lora_rank"] == 8  # the smallest rank vLLM takes above r=4


def test_vllm_keeps_no_core_idle_on_a_small_node(monkeypatch):
    """vLLM's CPU engine reserves a core for its scheduler by default: on a node of at most 4 cores a replica reserves
    none (the serve YAML or the replica's environment can still say otherwise); on a larger node vLLM decides."""
    import os

    from hone.serving.spec import resolve
    from hone.serving.vllm import engine_args, reserve_cores

    def reserved(cores: int, extra: dict | None = None, env: str | None = None) -> str | None:
        monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
        if env is not None:
            monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", env)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        cfg = validate_serve_config({"model": MODEL, "engine": "vllm", **(extra or {})})
        reserve_cores(engine_args(cfg, resolve(cfg)))
        return os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU")

    assert reserved(2) == "0" and reserved(4) == "0"
    assert reserved(16) is None
    assert reserved(16, {"vllm_cpu_reserved_cores": 2}) == "2" and reserved(2, {"vllm_cpu_reserved_cores": 1}) == "1"
    assert reserved(2, env="1") == "1"
    assert reserved(2, {"device": "cuda"}) is None


# --------------------------------------------------------------------------- one real vLLM server


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A real (randomly initialised, non-zero) LoRA adapter for SmolLM2, saved with peft."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from hone import assets

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(assets.resolve_model(MODEL))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("smollm2-lora")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """Greedy continuations computed locally with transformers/peft (fp32), one prompt at a time."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets

    path = assets.resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()

    def greedy(model, prompt: str, n: int = 8) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    plain = {p: greedy(base, p) for p in PROMPTS}
    adapted = greedy(peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval(), PROMPTS[0])
    return {"base": plain, "adapter": adapted}


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dir):
    tmp = tmp_path_factory.mktemp("serve-vllm")
    cfg = {"name": "v", "model": MODEL, "served_model_name": NAME, "engine": "vllm", "port": free_port(),
           "metrics_export_port": free_port(), "adapters": {"smollm2-lora": str(adapter_dir)}, "max_tokens_default": 16,
           "num_replicas": 1, "max_ongoing_requests": 4, "max_batch_size": 4, "max_queued_requests": 4, "retry_after_s": 3,
           "vllm_engine_args": {"max_model_len": 1024}, "vllm_cpu_kv_cache_gib": 1, "ray_actor_options": {"num_cpus": 1}}
    proc, info = start_server(cfg, tmp, {"HONE_API_KEYS": KEY})
    yield {**info, **cfg, "proc": proc, "log": tmp / "serve.log"}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)




@pytest.mark.slow
def test_openai_conformance(server, client, reference):
    ids = [m.id for m in client.models.list().data]
    assert ids == [NAME, "smollm2-lora"]
    out = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0)
    assert out.choices[0].text == reference["base"][PROMPTS[0]]  # vLLM's fp32 greedy decode = transformers'
    assert out.usage.completion_tokens == 8 and out.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.usage.prompt_tokens > 10  # the chat template wrapped the message
    pieces, usage = [], None
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        usage = chunk.usage or usage
    assert "".join(pieces) == chat.choices[0].message.content and len([p for p in pieces if p]) >= 2
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens
    stopped = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=["."])
    assert stopped.choices[0].finish_reason == "stop" and "." not in stopped.choices[0].text
    seeded = [client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.slow
def test_auth_and_errors(server):
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    missing = httpx.post(server["url"] + "/v1/completions", json={"model": NAME, "prompt": "x"}, timeout=30)
    assert missing.status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "nope", "prompt": "x"}, headers=headers, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(server["url"] + "/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 5000}, headers=headers, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # vllm_engine_args max_model_len 1024
    r = httpx.post(server["url"] + "/v1/classify", json={"model": NAME, "input": "x"}, headers=headers, timeout=30)
    assert r.status_code == 400


@pytest.mark.slow
def test_structured_outputs(client):
    """Constrained decoding through vLLM: JSON for a schema, any JSON object, and only the allowed choices."""
    for prompt in ("Describe a person.", "Who wrote Hamlet?"):
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=60, temperature=0,
                                             response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}})
        value = json.loads(out.choices[0].message.content)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)
    out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": 'Repeat this JSON: {"ok": true}'}],
                                         max_tokens=60, temperature=0, response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop", out.choices[0].message.content  # the grammar closed the object
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    labels = ["positive", "negative"]
    for review in ("A gorgeous, witty film.", "Two hours I will never get back.", "Meh.", "¿Qué?"):
        out = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"Sentiment of: {review}"}], max_tokens=8,
                                             temperature=0.7, extra_body={"structured_outputs": {"choice": labels}})
        assert out.choices[0].message.content in labels


@pytest.mark.slow
def test_n_and_logprobs(client):
    import openai

    one = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=4, temperature=0, logprobs=1, presence_penalty=1.0)
    logprobs = one.choices[0].logprobs  # logprobs=1 and a penalty of 1.0 reach the engine (not taken for "off")
    assert len(logprobs.tokens) == one.usage.completion_tokens and all(len(top) == 1 for top in logprobs.top_logprobs)
    out = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=6, n=3, temperature=1.0, seed=1, logprobs=2)
    assert [c.index for c in out.choices] == [0, 1, 2]
    # one request, one place in the queue: n and n × max_tokens are capped (serve YAML max_n, max_request_tokens)
    with pytest.raises(openai.BadRequestError, match="at most 8 completions per request"):
        client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=4, n=9)
    with pytest.raises(openai.BadRequestError, match="generates at most 16384"):
        client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=2100, n=8)
    assert out.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in out.choices)
    for c in out.choices:
        assert "".join(c.logprobs.tokens) == c.text
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs) and all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert content[0].top_logprobs[0].logprob == content[0].logprob  # greedy: the chosen token is the most likely one
    finished = {}
    for chunk in client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, n=2,
                                                temperature=1.0, stream=True):
        for choice in chunk.choices:
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}


@pytest.mark.slow
def test_multi_lora_by_model_name(client, reference):
    adapted = client.completions.create(model="smollm2-lora", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    base = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text
    assert base == reference["base"][PROMPTS[0]]
    assert adapted == reference["adapter"] and adapted != base


@pytest.mark.slow
def test_malformed_requests_get_4xx(server, client, reference):
    """The reliability issue's malformed requests, on engine: vllm: each a 4xx naming its parameter; the server still answers."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for route, bad, status, param in malformed(NAME, engine="vllm"):
        content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        r = httpx.post(server["url"] + route, content=content, headers=headers, timeout=60)
        assert r.status_code == status, (content[:120], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
        if param:
            assert error["param"] == param, error
    for constrained in ({"structured_outputs": {"choice": []}}, {"structured_outputs": {"choice": ["a"], "regex": "b"}},
                        {"response_format": {"type": "json_schema"}}, {"response_format": {"type": "yaml"}}):
        r = httpx.post(server["url"] + "/v1/completions", json={"model": NAME, "prompt": "x", **constrained}, headers=headers, timeout=60)
        assert r.status_code == 400, (constrained, r.text)
    out = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=8, temperature=1e-30)  # greedy, as vLLM does
    assert out.choices[0].text == reference["base"][PROMPTS[2]]


@pytest.mark.slow
def test_back_pressure_and_metrics(server, client):
    """Past max_ongoing_requests + max_queued_requests: 503 + Retry-After, nothing else; then hone's and vLLM's metrics."""
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 48, "temperature": 0}

    def one(_: int) -> httpx.Response:
        return httpx.post(server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)

    with cf.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(one, range(20)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and 503 in codes and codes.count(200) >= 4, codes
    refused = next(r for r in answers if r.status_code == 503)
    assert refused.headers["Retry-After"] == "3" and refused.json()["error"]["code"] == "server_overloaded"
    assert client.completions.create(model=NAME, prompt="x", max_tokens=2).choices[0].text is not None
    assert httpx.post(server["url"] + "/v1/completions", json=body, timeout=30).status_code == 401  # counted too

    def statuses(families: dict) -> set:
        return {(s.labels.get("route"), s.labels.get("status")) for s in families.get("ray_hone_requests_total", [])}

    wanted = {("/v1/completions", "200"), ("/v1/completions", "503"), ("/v1/completions", "401")}
    families = metrics(server["metrics_export_port"], lambda f: wanted <= statuses(f) and "ray_vllm_request_success_total" in f)
    assert wanted <= statuses(families), statuses(families)
    # hone's gauges stay exported while idle (refreshed by the replica's health check; Ray drops a gauge nobody sets)
    for name in ("ray_hone_time_to_first_token_seconds_count", "ray_hone_generation_tokens_total", "ray_hone_num_requests_running",
                 "ray_hone_num_requests_waiting", "ray_vllm_request_success_total", "ray_vllm_generation_tokens_total"):
        assert name in families, (name, sorted(n for n in families if "vllm" in n)[:20])


@pytest.mark.slow
def test_no_prompt_or_key_in_the_log(server):
    log = Path(server["log"]).read_text()
    assert KEY not in log and PROMPTS[2] not in log


@pytest.mark.slow
def test_a_w8a8_artifact_is_gated_on_vllm_and_served_by_it(tmp_path):
    """hone quantize --method w8a8-int8 writes vLLM's format, times both models on vLLM, and engine: vllm serves it (on the
    tiny Llama: this test is about the format and the path, not about what int8 costs a real model)."""
    from hone.artifacts import QUANTIZED_INFO, quantized_dir, resolve_ref

    tiny = "builtin:tiny-llama"
    # a loose gate: the tiny model's numbers mean nothing
    out = hone("quantize", tiny, "--method", "w8a8-int8", "-n", "8", "--max-loss-increase", "0.5", "--max-accuracy-drop", "0.5",
               timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    gate = json.loads((quantized_dir(resolve_ref(tiny), "w8a8-int8") / QUANTIZED_INFO).read_text())["gate"]
    assert gate["passed"] and gate["quantized"]["size_mb"] < 0.6 * gate["original"]["size_mb"]
    assert gate["original"]["decode_ms_per_token"] > 0 and gate["quantized"]["decode_ms_per_token"] > 0  # timed on vLLM
    cfg = {"name": "q", "model": tiny, "served_model_name": "tiny", "engine": "vllm", "quantization": "w8a8-int8", "port": free_port(),
           "metrics_export_port": free_port(), "num_replicas": 1, "vllm_cpu_kv_cache_gib": 1, "ray_actor_options": {"num_cpus": 1}}
    proc, info = start_server(cfg, tmp_path)
    try:
        import openai

        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)
        out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is the capital of France?"}],
                                             max_tokens=12, temperature=0)
        assert isinstance(out.choices[0].message.content, str) and out.usage.completion_tokens > 0
        labels = ["positive", "negative"]
        # (room for a label spelled one character at a time: the tiny tokenizer may have no token for it)
        choice = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Great film!"}], max_tokens=16,
                                                temperature=0, extra_body={"structured_outputs": {"choice": labels}})
        assert choice.choices[0].message.content in labels
    finally:
        stop_server(proc)
    assert "w8a8-int8" in (tmp_path / "serve.log").read_text()
