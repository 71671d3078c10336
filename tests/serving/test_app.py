"""hone serve: a real Ray Serve application on 127.0.0.1, driven with the official openai client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    ServeProbe,
    free_port,
    haproxy_configs,
    listen_addresses,
    malformed,
    metrics,
    start_server,
    stop_server,
    wait_until,
)

KEY = "sk-hone-test-key"
PROMPTS = ["The movie was", "I think that the acting", "A review: this film", "Overall the plot", "The director", "Fans of"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A real (randomly initialised, non-zero) LoRA adapter for the tiny Llama, saved with peft."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from hone import assets

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(assets.resolve_model("builtin:tiny-llama"))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_dir):
    tmp = tmp_path_factory.mktemp("serve")
    cfg = {"name": "t", "model": "builtin:tiny-llama", "port": free_port(), "metrics_export_port": free_port(),
           "adapters": {"tiny-sentiment": str(adapter_dir)}, "max_batch_size": 8, "batch_wait_timeout_s": 0.05,
           "max_tokens_default": 16, "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5},
           "max_request_bytes": 8 << 20}  # room for a prompt that takes seconds to tokenise
    proc, info = start_server(cfg, tmp, {"HONE_API_KEYS": f"other-key, {KEY}"})
    yield {**info, **cfg, "proc": proc, "log": tmp / "serve.log"}
    stop_server(proc)
    log = (tmp / "serve.log").read_text()
    assert KEY not in log and PROMPTS[1] not in log, "an API key or a prompt reached the server's log"


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(adapter_dir):
    """Greedy continuations computed locally with transformers/peft, one prompt at a time."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets

    path = assets.resolve_model("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path).eval()

    def greedy(model, prompt: str, n: int) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    plain = {p: greedy(base, p, 12) for p in PROMPTS}
    lora = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    adapted = {p: greedy(lora, p, 12) for p in PROMPTS[:2]}
    return {"base": plain, "adapter": adapted, "tokenizer": tok}


def test_models_lists_base_and_adapters(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-llama", "tiny-sentiment"]


def test_completion_matches_transformers_greedy(client, reference):
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert out.choices[0].text == reference["base"][PROMPTS[0]]
    assert out.choices[0].finish_reason == "length" and out.object == "text_completion"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == len(reference["tokenizer"](PROMPTS[0])["input_ids"])


def test_chat_completion_uses_the_chat_template(client, reference):
    messages = [{"role": "user", "content": "Is this review positive? 'A delight.'"}]
    out = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=6, temperature=0)
    tok = reference["tokenizer"]
    expected_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.usage.prompt_tokens == len(tok(expected_prompt, add_special_tokens=False)["input_ids"])
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    assert out.choices[0].finish_reason in ("length", "stop")


def test_streaming_sends_tokens_as_they_come(client, reference):
    chunks = list(client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len([t for t in texts if t]) >= 3
    assert "".join(texts) == reference["base"][PROMPTS[0]]
    assert chunks[-1].choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chat_chunks = list(stream)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage is not None and chat_chunks[-1].usage.completion_tokens >= 1


def test_raw_sse_framing(server):
    body = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_stop_and_seed(client, reference):
    full = reference["base"][PROMPTS[0]]
    stop_word = full.strip().split()[1] if len(full.split()) > 1 else full[2:4]
    out = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop_word])
    assert out.choices[0].finish_reason == "stop" and stop_word not in out.choices[0].text
    assert full.startswith(out.choices[0].text)
    a = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=7)
    b = client.completions.create(model="tiny-llama", prompt=PROMPTS[1], max_tokens=10, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_concurrent_requests_share_batches(server, client, reference):
    def one(prompt: str) -> str:
        return client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        texts = list(pool.map(one, PROMPTS))
    assert texts == [reference["base"][p] for p in PROMPTS]  # batched greedy == one-at-a-time greedy
    def batched(families: dict) -> bool:  # some batch held more than one sequence (Ray exports every ~10 s)
        buckets = {s.labels["le"]: s.value for s in families.get("ray_hone_batch_size_bucket", [])}
        counts = [s.value for s in families.get("ray_hone_batch_size_count", [])]
        return bool(counts) and max(counts) > buckets.get("1.0", 0)

    families = metrics(server["metrics_export_port"], batched)
    assert batched(families), families.get("ray_hone_batch_size_bucket")


def test_multi_lora_routes_by_model_name(client, reference):
    adapted = client.completions.create(model="tiny-sentiment", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    base = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    assert adapted == reference["adapter"][PROMPTS[0]]
    assert base == reference["base"][PROMPTS[0]]
    assert adapted != base


def test_structured_outputs_on_hones_engine(client):
    """A choice, a regex and a JSON schema through the HTTP path (xgrammar in the replica), streamed and not; a schema
    that cannot be compiled is a 400."""
    import openai

    labels = ["positive", "negative"]
    for prompt in PROMPTS[:3]:
        out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=1.0,
                                        extra_body={"structured_outputs": {"choice": labels}})
        assert out.choices[0].text in labels and out.choices[0].finish_reason == "stop"
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny-sentiment", prompt=PROMPTS[0], max_tokens=8,
                                                                   temperature=0, stream=True,
                                                                   extra_body={"structured_outputs": {"regex": "[0-9]{4}"}}) if c.choices]
    assert len("".join(pieces)) == 4 and "".join(pieces).isdigit()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "x"}], max_tokens=12, temperature=0,
                                          response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert json.loads(chat.choices[0].message.content) in ({"ok": True}, {"ok": False})
    with pytest.raises(openai.BadRequestError, match="could not be compiled"):
        client.completions.create(model="tiny-llama", prompt="x", max_tokens=4, extra_body={"structured_outputs": {"regex": "([a-z"}})
    # a 100 kB regex is refused before anything compiles it, while a neighbour's request is answered
    with cf.ThreadPoolExecutor(1) as pool:
        neighbour = pool.submit(client.completions.create, model="tiny-llama", prompt=PROMPTS[1], max_tokens=8, temperature=0)
        with pytest.raises(openai.BadRequestError, match="compiles constraints of at most 16384 bytes"):
            client.completions.create(model="tiny-llama", prompt="x", max_tokens=4,
                                      extra_body={"structured_outputs": {"regex": "(a|b)" * 20_000}})
        assert neighbour.result(timeout=120).choices[0].text is not None


def test_auth(server):
    url = server["url"]
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    missing = httpx.get(url + "/v1/models", timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": "x"}, headers={"Authorization": "Bearer nope"},
                       timeout=10)
    assert wrong.status_code == 401 and "incorrect API key" in wrong.json()["error"]["message"]
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    other = openai.OpenAI(base_url=url + "/v1", api_key="other-key", max_retries=0)
    assert other.models.list().data[0].id == "tiny-llama"


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "not valid JSON"),
    ('["a list"]', 400, "JSON object"),
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny-llama"}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": "x", "temperature": 5}, 400, "temperature"),
    ({"model": "tiny-llama", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny-llama", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny-llama", "prompt": "x", "n": 3}, 400, "n"),
    ({"model": "tiny-llama", "prompt": "x", "max_tokens": 100000}, 400, "maximum context length"),
    ({"model": "tiny-llama", "prompt": ["a", "b"]}, 400, "one prompt"),
    ({"model": "tiny-llama", "prompt": "", "max_tokens": 2}, 400, "empty"),
    ({"model": "tiny-llama", "prompt": "x", "stop": [""]}, 400, "stop"),
])
def test_bad_input_gets_a_clear_openai_error(server, body, status, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server["url"] + "/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"


def test_bad_chat_and_classify_input(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "tiny-llama", "messages": []}, headers=headers, timeout=30)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "tiny-llama", "messages": [{"role": "robot", "content": "x"}]},
                   headers=headers, timeout=30)
    assert r.status_code == 400
    r = httpx.post(server["url"] + "/v1/classify", json={"model": "tiny-llama", "input": "x"}, headers=headers, timeout=30)
    assert r.status_code == 400 and "causal LM" in r.json()["error"]["message"]
    # the replica survived all of it
    ok = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 2}, headers=headers,
                    timeout=30)
    assert ok.status_code == 200


def test_malformed_requests_get_4xx_and_a_running_request_is_unaffected(server, reference):
    """Every refusal is a 4xx in the OpenAI error shape naming the parameter; tiny temperatures decode greedily
    (they used to overflow sampling), and a greedy stream decoding meanwhile returns its solo text."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    body = {"model": "tiny-llama", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0, "stream": True}

    def greedy_stream() -> str:
        with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=headers, timeout=120) as r:
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {") and json.loads(line[6:])["choices"])

    with cf.ThreadPoolExecutor(4) as pool:
        running = pool.submit(greedy_stream)
        tiny = [pool.submit(httpx.post, server["url"] + "/v1/completions", headers=headers, timeout=120,
                            json={"model": "tiny-llama", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": t}) for t in (1e-30, 1e-45)]
        for route, bad, status, param in malformed("tiny-llama", max_request_bytes=server["max_request_bytes"]):
            content = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
            r = httpx.post(server["url"] + route, content=content, headers=headers, timeout=60)
            assert r.status_code == status, (bad if len(content) < 300 else content[:80], r.status_code, r.text[:300])
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["message"], error
            if param:
                assert error["param"] == param, error
            if param in ("logprobs", "echo", "logit_bias", "tools", "response_format", "n"):
                assert "unsupported" in error["message"] and error["code"] == "unsupported_parameter", error
        assert running.result() == reference["base"][PROMPTS[3]]
        for answer in tiny:
            assert answer.result().status_code == 200 and answer.result().json()["choices"][0]["text"] == reference["base"][PROMPTS[3]]


def test_a_huge_prompt_is_tokenised_without_stalling_other_streams(server, reference):
    """A ~7 MB prompt takes seconds to tokenise, then is refused for its length; meanwhile streams keep flowing.

    Tokenised on the replica's event loop (as it used to be), each of the huge prompts stalled every stream on the
    replica for the whole tokenisation: one gap of about that length per huge prompt. Off the loop, a stream only sees
    scheduling hiccups, which on a busy 2-core machine (two lanes: training beside it) last up to about
    a second: the prompt is made large enough that its tokenisation takes several times longer."""
    tok = reference["tokenizer"]
    huge = "word " * 1_400_000
    started = time.perf_counter()
    tok(huge)
    tokenise_s = time.perf_counter() - started  # the same work the replica does, measured here as the baseline
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 1600, "temperature": 0, "stream": True}
    arrivals: list[float] = []
    first = cf.Future()
    stop = threading.Event()

    def streams() -> None:  # one stream after another (a new one at once) until the huge prompts are done
        while not stop.is_set():
            with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=headers, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        arrivals.append(time.perf_counter())
                        if not first.done():
                            first.set_result(True)
                    if stop.is_set():
                        break

    n_huge = 2
    with cf.ThreadPoolExecutor(1) as pool:
        done = pool.submit(streams)
        first.result(timeout=60)
        window = [time.perf_counter()]
        for _ in range(n_huge):
            r = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny-llama", "prompt": huge}, headers=headers, timeout=120)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        window.append(time.perf_counter())
        wait_until(lambda: arrivals[-1] > window[1] or done.done(), "a token after the huge prompts", timeout=60)
        stop.set()
        done.result(timeout=120)
    during = [t for t in arrivals if window[0] <= t <= window[1]]
    stalls = [b - a for a, b in zip(during, during[1:]) if b - a >= 0.9 * tokenise_s]
    assert len(during) > 20 and len(stalls) <= 1, (len(during), stalls, tokenise_s)


def test_openapi_publishes_request_schemas_and_fuzzing_finds_no_5xx(server, reference, tmp_path):
    """/openapi.json (behind the key) declares the POST bodies; schemathesis sends 500+ generated requests
    (valid and invalid) and none gets a 5xx; healthy requests are still served the same afterwards."""
    url = server["url"]
    assert httpx.get(url + "/openapi.json", timeout=10).status_code == 401
    assert httpx.get(url + "/docs", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 404
    doc = httpx.get(url + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    bodies = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest", "/v1/classify": "ClassifyRequest"}
    for path, name in bodies.items():
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{name}"
        assert doc["components"]["schemas"][name]["properties"]["model"]["enum"] == ["tiny-llama", "tiny-sentiment"]
    assert doc["components"]["schemas"]["ChatRequest"]["properties"]["tools"]["enum"] == [None, []]
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(doc))
    report = tmp_path / "st.ndjson"
    out = subprocess.run(
        [str(Path(sys.executable).parent / "st"), "run", str(schema), "--url", url, "-H", f"Authorization: Bearer {KEY}",
         "--checks", "not_a_server_error", "--max-examples", "60", "--seed", "1", "--no-shrink", "--workers", "2",
         "--generation-database", "none", "--request-timeout", "60", "--report", "ndjson", "--report-ndjson-path", str(report)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,  # its own cache folder lands there
    )
    statuses = [int(code) for code in re.findall(r'"status_code":\s*(\d+)', report.read_text())]
    counts = {code: statuses.count(code) for code in sorted(set(statuses))}
    print(f"schemathesis: {len(statuses)} requests, by status {counts}")
    assert out.returncode == 0, out.stdout[-4000:]
    assert len(statuses) >= 500 and not [c for c in statuses if c >= 500], counts
    assert counts.get(200, 0) >= 50, counts  # the schema lets it build requests the server accepts, not only refusals
    ok = httpx.post(url + "/v1/completions", json={"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == reference["base"][PROMPTS[0]]


def _long_streams(server, n: int, max_tokens: int, model: str = "tiny-llama",
                  stop: threading.Event | None = None) -> tuple[cf.ThreadPoolExecutor, list[cf.Future]]:
    """``n`` greedy streams of ``max_tokens`` tokens; each returns the token events it read. With ``stop``, a stream's
    client goes away at its first event after ``stop`` is set."""
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0, "stream": True}

    def one(_: int) -> int:
        n = 0
        with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers=headers, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                assert '"error"' not in line, line
                n += line.startswith("data: {")
                if stop is not None and stop.is_set():
                    break
        return n

    pool = cf.ThreadPoolExecutor(n)
    return pool, [pool.submit(one, i) for i in range(n)]


def test_a_client_that_disconnects_before_its_first_token_frees_its_place(server):
    """The batch's streams run until the extra request's place is freed (up to the model's context, 2048 tokens, however
    long the disconnect takes to reach the replica on a busy machine); then their clients go away too, which frees their
    batch rows."""
    monitor = ServeProbe(server["ray_address"], server["name"])
    stop = threading.Event()
    try:
        monitor.watch()
        pool, streams = _long_streams(server, server["max_batch_size"], 2040, stop=stop)  # a full batch, decoding
        monitor.wait_for(lambda s: s["running"] == server["max_batch_size"], "a full batch")
        body = json.dumps({"model": "tiny-llama", "prompt": "x", "max_tokens": 50, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", server["port"])) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer " + KEY.encode() +
                        b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            monitor.wait_for(lambda s: s["waiting"] == 1, "the extra request to wait for a place")
            left = time.time()
        # the client went away before any token: its request leaves the replica while the batch is still decoding
        monitor.wait_for(lambda s: s["waiting"] == 0 and s["running"] == server["max_batch_size"], "its place to be freed", after=left)
        stop.set()
        assert all(f.result(timeout=300) > 0 for f in streams)  # every stream of the batch went on undisturbed (no error)
        pool.shutdown()
        # the batch's clients went away mid-stream: their rows are freed at the next decode step
        monitor.wait_for(lambda s: s["running"] == 0 and s["waiting"] == 0, "an idle replica", after=time.time())
    finally:
        stop.set()
        monitor.close()


def test_an_adapter_request_is_not_starved_by_continuous_base_load(server, client, reference):
    """Base requests keep joining the running batch; an adapter request waiting meanwhile still goes next once the batch
    drains (it used to wait until the base load stopped)."""
    headers = {"Authorization": f"Bearer {KEY}"}
    stop_at = time.time() + 60
    adapter_done = cf.Future()

    def base_load(_: int) -> int:
        n = 0
        while time.time() < stop_at and not adapter_done.done():
            r = httpx.post(server["url"] + "/v1/completions", headers=headers, timeout=120,
                           json={"model": "tiny-llama", "prompt": PROMPTS[n % len(PROMPTS)], "max_tokens": 48, "temperature": 0})
            assert r.status_code == 200, r.text
            n += 1
        return n

    with cf.ThreadPoolExecutor(6) as pool:
        load = [pool.submit(base_load, i) for i in range(6)]
        time.sleep(2)
        sent = time.time()
        out = client.completions.create(model="tiny-sentiment", prompt=PROMPTS[0], max_tokens=12, temperature=0)
        waited = time.time() - sent
        adapter_done.set_result(True)
        finished = [f.result() for f in load]
    assert out.choices[0].text == reference["adapter"][PROMPTS[0]]
    assert time.time() < stop_at, "the base load ended before the adapter request was answered"
    assert sum(finished) >= 6 and waited < 30, (waited, finished)


def test_metrics_on_the_ray_export_port(server, client):
    client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=4, temperature=0)
    def statuses(families: dict) -> set:
        return {(s.labels.get("route"), s.labels.get("status")) for s in families.get("ray_hone_requests_total", [])}

    wanted = {("/v1/completions", "200"), ("/v1/completions", "404"), ("/v1/completions", "400"), ("/v1/models", "401")}
    families = metrics(server["metrics_export_port"], lambda f: wanted <= statuses(f))
    assert wanted <= statuses(families), statuses(families)
    for name in ("ray_hone_e2e_request_latency_seconds_count", "ray_hone_time_to_first_token_seconds_count",
                 "ray_hone_time_per_output_token_seconds_count", "ray_hone_prompt_tokens_total", "ray_hone_generation_tokens_total",
                 "ray_hone_num_requests_running", "ray_hone_num_requests_waiting"):
        assert name in families, name
    assert any(name.startswith("ray_serve_") for name in families), "Ray Serve's own metrics are missing"


# --------------------------------------------------------------------------- personal data in answers

ANSWER = ("Write to jane.doe@example.com or call +1 (415) 555-0132 from 192.168.10.7 today. "
          "The rest of this answer is ordinary text that goes on for a while, and then it ends.")


def _check_masked_answers(url: str) -> None:
    """``mask_pii: output``: an answer the grammar forces to hold an e-mail address, a phone number and an IP address
    arrives masked, whole and streamed; the stream arrives in more than one run, none with a value in it."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    regex = ANSWER.replace(".", "\\.").replace("+", "\\+").replace("(", "\\(").replace(")", "\\)")
    ask = {"model": "tiny-llama", "prompt": "Contact:", "max_tokens": 400, "temperature": 0,
           "extra_body": {"structured_outputs": {"regex": regex}}}
    masked = ANSWER.replace("jane.doe@example.com", "<EMAIL_ADDRESS>").replace("+1 (415) 555-0132", "<PHONE_NUMBER>") \
        .replace("192.168.10.7", "<IP_ADDRESS>")
    whole = client.completions.create(**ask).choices[0]
    assert whole.text == masked and whole.finish_reason == "stop", whole
    pieces = [c.choices[0].text for c in client.completions.create(**ask, stream=True) if c.choices and c.choices[0].text]
    assert "".join(pieces) == masked and len(pieces) >= 2, pieces
    assert not any(v in p for p in pieces for v in ("jane.doe", "555-0132", "192.168")), pieces


# --------------------------------------------------------------------------- autoscaling and back-pressure


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Ray Serve's HAProxy binary ships for Linux")
def test_back_pressure_and_autoscaling_behind_haproxy(tmp_path, reference):
    """The serve YAML's queue bound and autoscaling, behind ``proxy: haproxy`` (the default proxy serves the module's
    server): answers pass through HAProxy unchanged, a hone serve killed with SIGKILL leaves nothing holding its ports,
    and stopping hone serve stops its HAProxy."""
    port = free_port()
    cfg = {"name": "scale", "model": "builtin:tiny-llama", "port": port, "metrics_export_port": free_port(), "proxy": "haproxy",
           "max_batch_size": 2, "batch_wait_timeout_s": 0.0, "max_tokens_default": 16,
           "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
                                  "downscale_delay_s": 4, "metrics_interval_s": 0.5, "look_back_period_s": 2},
           "max_ongoing_requests": 2, "max_queued_requests": 2, "ray_actor_options": {"num_cpus": 0.25}, "retry_after_s": 2}
    proc, info = start_server(cfg, tmp_path)
    url = info["url"] + "/v1/completions"
    body = {"model": "tiny-llama", "prompt": "The movie was", "max_tokens": 600, "temperature": 0}
    probe = None
    try:
        probe = ServeProbe(info["ray_address"], "scale")
        assert any(f":{port}" in text for text in haproxy_configs()), "no HAProxy in front of the service"
        assert listen_addresses(cfg["metrics_export_port"]) == {"127.0.0.1"}, "Ray's metrics export listens beyond this machine"
        import openai

        client = openai.OpenAI(base_url=info["url"] + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompt = PROMPTS[0]
        out = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == reference["base"][prompt]
        pieces = [c.choices[0].text for c in client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=12,
                                                                          temperature=0, stream=True) if c.choices]
        assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == reference["base"][prompt]
        bad = httpx.post(info["url"] + "/v1/completions", content=b"{not json", timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
        assert probe.running() == 1

        def one(_: int) -> httpx.Response:
            return httpx.post(url, json=body, timeout=120)

        # A burst far past the queue bound: some requests are refused at once with 503 + Retry-After,
        # every other one completes; none hangs.
        with cf.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(one, range(24)))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        refused = [r for r in answers if r.status_code == 503]
        assert refused and codes.count(200) >= 2, codes
        assert refused[0].headers["Retry-After"] == "2"
        assert refused[0].json()["error"]["code"] == "server_overloaded"

        # Sustained load scales the model deployment up to 2 replicas ...
        until = time.time() + 90
        scaled = False
        with cf.ThreadPoolExecutor(4) as pool:
            while time.time() < until and not scaled:
                list(pool.map(one, range(4)))
                scaled = probe.running() == 2
        assert scaled, "the model deployment never scaled up to 2 replicas"
        # ... and back down once idle.
        probe.wait_running(1, timeout=90)
    finally:
        if probe is not None:
            probe.close()
        proc.kill()  # as the OOM killer ends it: SIGKILL to hone serve alone, nothing of it shuts down
        proc.wait()
    # Its watchdog ends the Ray session's agents, workers and HAProxy: the serve and metrics ports are free within seconds
    # (Ray's dashboard agent held the metrics port for about a minute), and the same config starts again and answers.
    from hone.runtime import port_in_use

    wait_until(lambda: not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", cfg["metrics_export_port"]),
               "the killed server's ports to be free", timeout=20)
    assert not any(f":{port}" in text for text in haproxy_configs()), "HAProxy outlived a SIGKILLed hone serve"
    again = tmp_path / "again"
    again.mkdir()
    proc, info = start_server({**cfg, "mask_pii": "output"}, again)  # the same ports; personal data masked in answers
    try:
        r = httpx.post(url, json={**body, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
        _check_masked_answers(info["url"])
    finally:
        stop_server(proc)
    # SIGTERM reached hone's own handler (Ray installs one that would end the process on the spot), Serve shut down,
    # and the service's HAProxy went with it: nothing holds the port.
    assert "[hone] shutting down" in (again / "serve.log").read_text()
    assert not any(f":{port}" in text for text in haproxy_configs()), "HAProxy outlived hone serve"
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
