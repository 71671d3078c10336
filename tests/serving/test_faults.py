"""Faults under load on a real hone serve with two model replicas: a replica killed while the service starts, a
replica killed in the middle of ~1,000 requests, a stream whose replica dies, and SIGTERM during a long stream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from hone.serving.failover import MAX_DEATHS

from tests.helpers import ServeProbe, free_port, metrics, model_replica_pids, start_server, stop_server

pytestmark = pytest.mark.slow

APP = "faults"
PROMPTS = ["The movie was", "I think that the acting", "A review: this film", "Overall the plot", "The director", "Fans of"]


LONG = 1000  # tokens of the long greedy stream whose replica is killed after its first few
CRASH = "this prompt ends the replica that runs it"  # HONE_TEST_CRASH_PROMPT: the replica's fault hook


@pytest.fixture(scope="module")
def reference():
    """Greedy continuations computed locally with transformers, one prompt at a time: 16 tokens of each prompt, and the
    long stream's LONG tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets

    path = assets.resolve_model("builtin:tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()

    def greedy(prompt: str, n: int) -> str:
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return {**{prompt: greedy(prompt, 16) for prompt in PROMPTS}, "long": greedy(PROMPTS[4], LONG)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two fixed replicas; the first model replica process to appear is SIGKILLed while the application starts."""
    tmp = tmp_path_factory.mktemp("faults")
    crashes = tmp / "crashes.log"
    cfg = {"name": APP, "model": "builtin:tiny-llama", "port": free_port(), "metrics_export_port": free_port(), "num_replicas": 2,
           "max_batch_size": 8, "max_ongoing_requests": 16, "max_queued_requests": 64, "max_tokens_default": 16,
           "ray_actor_options": {"num_cpus": 0.5}, "retry_after_s": 1}
    killed: list[int] = []

    def kill_first_replica() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            pids = model_replica_pids(APP)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_replica, daemon=True)
    watcher.start()
    proc, info = start_server(cfg, tmp, {"HONE_TEST_CRASH_PROMPT": CRASH, "HONE_TEST_CRASH_LOG": str(crashes)})
    watcher.join(timeout=5)
    probe = ServeProbe(info["ray_address"], APP)
    yield {**info, **cfg, "proc": proc, "log": tmp / "serve.log", "killed_at_start": killed, "probe": probe, "crashes": crashes}
    probe.close()
    stop_server(proc)


def test_a_replica_killed_while_the_service_starts_does_not_end_it(server, reference):
    assert server["killed_at_start"], "no model replica was seen starting"
    assert server["proc"].poll() is None, "hone serve ended"
    body = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 16, "temperature": 0}
    r = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference[PROMPTS[0]]
    assert r.headers["x-hone-replica"]  # which replica answered
    server["probe"].wait_running(2)


def _stream_killing_its_replica(url: str, body: dict, pids: dict[str, int], after_lines: int) -> dict:
    """Stream ``body``; once ``after_lines`` events have arrived, SIGKILL the replica that serves it (the response's
    X-Hone-Replica header, mapped to its process by ``pids``); read the stream to its end."""
    lines: list[str] = []
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        replica = r.headers["x-hone-replica"]
        killed = None
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == after_lines:
                killed = pids[replica]
                os.kill(killed, signal.SIGKILL)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return {"replica": replica, "pid": killed, "lines": lines, "events": events,
            "text": "".join(e["choices"][0]["text"] for e in events if e.get("choices"))}


async def _one(client: httpx.AsyncClient, url: str, i: int) -> dict:
    prompt = PROMPTS[i % len(PROMPTS)]
    stream = i % 3 == 0
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": stream}
    try:
        if not stream:
            r = await client.post(url, json=body)
            ok = r.status_code == 200
            return {"prompt": prompt, "stream": False, "status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "text": r.json()["choices"][0]["text"] if ok else None, "error": None if ok else r.json().get("error")}
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"prompt": prompt, "stream": True, "status": r.status_code, "retry_after": r.headers.get("retry-after"),
                        "text": None, "error": r.json().get("error")}
            text, done, error = "", False, None
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                    elif event["choices"]:
                        text += event["choices"][0]["text"]
            return {"prompt": prompt, "stream": True, "status": 200, "retry_after": None, "text": text, "done": done, "error": error}
    except httpx.TimeoutException:
        return {"prompt": prompt, "stream": stream, "status": "hung"}


async def _load(url: str, total: int, concurrency: int, on_progress) -> list[dict]:
    queue = list(range(total))
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker() -> None:
            while queue:
                results.append(await _one(client, url, queue.pop()))
                on_progress(len(results))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def test_a_replica_killed_in_the_middle_of_1000_requests_loses_none(server, reference):
    """1,000 greedy requests (a third streaming) at 32 concurrent. After 300 answers a long greedy stream starts; after its
    first tokens the replica serving it (its X-Hone-Replica header) is SIGKILLed: the kill lands on work in flight by
    construction. That stream resumes on the other replica after the text it already sent and ends with exactly the
    reference text; every other request ends 200 with the right text (a request whose replica died is sent again, a
    stream resumes) or 503 with Retry-After; none hangs; Serve replaces the replica."""
    probe = server["probe"]
    probe.wait_running(2)
    pids = probe.replica_pids()
    assert len(pids) == 2, pids
    url = server["url"] + "/v1/completions"
    started = threading.Event()
    loaded: list[dict] = []
    answered = [0]

    def progress(done: int) -> None:
        answered[0] = done
        if done >= 300:
            started.set()

    load = threading.Thread(target=lambda: loaded.extend(asyncio.run(_load(url, 1000, 32, progress))), daemon=True)
    begun = time.time()
    load.start()
    assert started.wait(timeout=600), "the load never reached 300 answers"
    body = {"model": "tiny-llama", "prompt": PROMPTS[4], "max_tokens": LONG, "temperature": 0, "stream": True}
    long = _stream_killing_its_replica(url, body, pids, after_lines=5)
    answered_at_kill = answered[0]
    load.join(timeout=600)
    wall = time.time() - begun
    assert long["pid"] is not None, long["lines"][-3:]
    assert long["text"] == reference["long"], "the stream whose replica was killed did not resume with the reference text"
    assert long["lines"][-1] == "data: [DONE]" and long["events"][-1]["choices"][0]["finish_reason"] == "length"

    results = loaded
    counts: dict[str, int] = {}
    for r in results:
        key = f"{r['status']}{' stream' if r['stream'] else ''}"
        counts[key] = counts.get(key, 0) + 1
    print(f"load test: {len(results)} requests in {wall:.0f}s at 32 concurrent; replica {long['replica']} killed under a long "
          f"stream when {answered_at_kill} had been answered: {counts}")
    assert len(results) == 1000
    assert not [r for r in results if r["status"] == "hung"], counts
    assert {r["status"] for r in results} <= {200, 503}, counts
    for r in results:
        if r["status"] == 503:
            assert r["retry_after"] == "1" and r["error"]["code"] in ("replica_unavailable", "server_overloaded"), r
        else:
            assert r["error"] is None and r["text"] == reference[r["prompt"]], r
            assert not r["stream"] or r["done"], r
    assert counts.get("200", 0) + counts.get("200 stream", 0) >= 900, counts

    def failovers(families: dict) -> dict[str, float]:
        return {s.labels["kind"]: s.value for s in families.get("ray_hone_replica_failovers_total", [])}

    recovered = failovers(metrics(server["metrics_export_port"], lambda f: failovers(f).get("resume", 0) >= 1))
    print(f"load test: requests recovered from the killed replica: {recovered}")
    assert recovered.get("resume", 0) >= 1, recovered  # the long stream, at least
    probe.wait_running(2)  # replaced
    assert long["pid"] not in model_replica_pids(APP)


def test_a_stream_whose_replica_dies_ends_with_an_error_event_and_done(server):
    """A sampled (unseeded) stream cannot resume elsewhere: it gets an SSE error event, then [DONE], and is counted."""
    probe = server["probe"]
    probe.wait_running(2)
    body = {"model": "tiny-llama", "prompt": PROMPTS[1], "max_tokens": 1500, "temperature": 1.0, "stream": True}
    out = _stream_killing_its_replica(server["url"] + "/v1/completions", body, probe.replica_pids(), after_lines=5)
    lines = out["lines"]
    assert out["pid"] is not None and lines[-1] == "data: [DONE]", lines[-3:]
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "replica_unavailable" and error["type"] == "server_error", error

    def counted(families: dict) -> bool:
        return any(s.labels.get("status") == "503" and s.value >= 1 for s in families.get("ray_hone_requests_total", []))

    assert counted(metrics(server["metrics_export_port"], counted))
    probe.wait_running(2)


def test_a_request_that_kills_its_replica_is_sent_once_more_then_refused(server):
    """A request whose replica dies while running it is sent again once; when that replica dies too, it gets 503 and is
    not sent a third time (it may be what kills them), and the service goes on answering others."""
    probe = server["probe"]
    probe.wait_running(2)
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny-llama", "prompt": CRASH, "max_tokens": 4}, timeout=300)
    assert r.status_code == 503 and "it is not sent again" in r.json()["error"]["message"], r.text
    assert len(server["crashes"].read_text().split()) == MAX_DEATHS, server["crashes"].read_text()
    probe.wait_running(2)  # Serve replaced them
    ok = httpx.post(server["url"] + "/v1/completions", json={"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 4,
                                                           "temperature": 0}, timeout=300)
    assert ok.status_code == 200, ok.text
    assert len(server["crashes"].read_text().split()) == MAX_DEATHS  # nothing sent it again meanwhile


def test_sigterm_during_a_long_stream_lets_it_finish(server):
    """Stopping hone serve (SIGTERM, as Kubernetes does) drains: a stream already running completes within the graceful
    shutdown timeout, then the process exits."""
    server["probe"].wait_running(2)
    body = {"model": "tiny-llama", "prompt": PROMPTS[2], "max_tokens": 1500, "temperature": 0, "stream": True}
    lines: list[str] = []
    late: list[httpx.Response] = []

    def knock_late() -> None:  # new requests once draining has begun are turned away, with a hint when to come back
        deadline = time.time() + 20
        while time.time() < deadline and not (late and late[-1].status_code == 503):
            try:
                late.append(httpx.post(server["url"] + "/v1/completions", json={**body, "stream": False, "max_tokens": 4}, timeout=60))
            except httpx.HTTPError:  # the service is gone: no 503 was seen while it drained
                return
            time.sleep(0.3)

    knocker = threading.Thread(target=knock_late, daemon=True)
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                continue
            lines.append(line)
            if len(lines) == 3:
                server["proc"].send_signal(signal.SIGTERM)
                knocker.start()
    knocker.join(timeout=30)
    assert lines[-1] == "data: [DONE]", lines[-3:]
    finish = json.loads(lines[-2][6:])["choices"][0]["finish_reason"]
    assert finish == "length", lines[-2]
    assert late and late[-1].status_code == 503 and late[-1].headers["retry-after"] == "1", late
    assert late[-1].json()["error"]["code"] == "server_shutting_down"
    assert all(r.status_code == 200 for r in late[:-1]), late  # (answered normally until the drain began)
    server["proc"].wait(timeout=60)
    assert "[hone] shutting down" in server["log"].read_text()
    assert "still running after" not in server["log"].read_text()
