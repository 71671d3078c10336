"""Serving throughput and latency: hone serve against a naive baseline measured in the same run.

Baseline: one FastAPI + uvicorn process whose endpoint calls ``model.generate`` per request
(same model, same machine, same greedy decoding and max_tokens). hone: ``hone serve`` with one
replica that batches concurrent requests. Each server is loaded with streaming OpenAI
completion requests at concurrency 1, 8 and 32, on two workloads (``--workload``): ``story``, continuations of
48 tokens (decode-bound), and ``sentiment``, a review labelled in a word or two (max_tokens 16, prefill-bound);
reported: requests/s, generated tokens/s,
p50/p99 latency, p50 time to first token (the baseline does not stream: its TTFT is its
latency). Then the Serve layer's own cost (``--overhead-model``, the tiny built-in model by
default, so that compute noise does not drown it): p50 of a 1-token request over HTTP, streamed
and not, against the same request on the engine called in-process, and Ray Serve's own floor on
this machine, the same request shape through an empty application of hone's shape (a FastAPI
ingress deployment calling a model deployment that returns a constant), each behind Ray Serve's
proxy and behind HAProxy (``proxy: haproxy``). The engine is timed back to back and called once
per 10 ms, as a replica sees requests that come one at a time (its caches are then cold).
Then vLLM (``--engines ...,vllm``): bare vLLM's own OpenAI server (same model, same machine, ``--enforce-eager``, fp32)
against ``hone serve`` with ``engine: vllm`` (vLLM's engine behind hone's ingress), both streamed at each concurrency;
printed: hone/bare ratios of requests/s and p50 (targets >= 0.97x and within 5%). ``--vllm-only`` runs just that pair.
``--mask-output`` runs just ``mask_pii: output`` against the same server without it (story answers of 128 tokens by
default, streamed, on the first of ``--engines``): the ratios of requests/s, p50 and time to the first visible text.
Finally fp32 against the int8 artifact ``hone quantize``
writes (run first if missing): decode latency, memory and size from its quality gate, and
throughput at concurrency 8.

    python bench/serve_load.py [--model builtin:smollm2-135m-instruct] [--levels 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
HONE = str(Path(sys.executable).parent / "hone")
WORKLOADS = {
    # short answers: the model says a label and stops (prefill-bound)
    "sentiment": [
        "Review: a gorgeous, witty, seductive movie. Is this review positive or negative?",
        "Review: the plot is a mess and the acting is worse. Is this review positive or negative?",
        "Review: a quiet, moving film that stays with you. Is this review positive or negative?",
        "Review: two hours I will never get back. Is this review positive or negative?",
    ],
    # long continuations (decode-bound): every request generates max_tokens tokens or close to it
    "story": [
        "Once upon a time, in a small village by the sea,",
        "The history of the city begins in the year",
        "In this chapter we describe how the engine works. First,",
        "My favourite recipe starts with",
    ],
}
PROMPTS = WORKLOADS["sentiment"]
ANSWER_TOKENS = {"sentiment": 16, "story": 48}  # max_tokens of each workload (--max-tokens overrides both)
RUNS: list[tuple[str, int]] = [("story", 48), ("sentiment", 16)]
"""The (workload, max_tokens) pairs every server is loaded with (``--workload``: both by default, decode-bound first)."""

BASELINE = textwrap.dedent("""
    import sys, torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from hone import assets
    path = assets.resolve_model(sys.argv[1])
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    app = FastAPI()
    class Req(BaseModel):
        prompt: str
        max_tokens: int = 16
    @app.get("/health")
    def health():
        return {"ok": True}
    @app.post("/v1/completions")
    def complete(req: Req):  # sync: FastAPI runs it in its thread pool, one generate per request
        ids = tok(req.prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=req.max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"choices": [{"text": tok.decode(new, skip_special_tokens=True)}], "usage": {"completion_tokens": int(new.numel())}}
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early ({proc.returncode})")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not up after {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # a server's own clean shutdown; its group is killed if that hangs
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def _one(client, url: str, model: str, i: int, max_tokens: int, stream: bool) -> tuple[float, float, int]:
    body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    if not stream:
        r = await client.post(url, json=body)
        r.raise_for_status()
        done = time.perf_counter() - started
        return done, done, r.json()["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    first, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                first = time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    done = time.perf_counter() - started
    return done, first if first is not None else done, tokens


async def _load(url: str, model: str, concurrency: int, n: int, max_tokens: int, stream: bool) -> dict[str, float]:
    import httpx

    results: list[tuple[float, float, int]] = []
    queue = list(range(n))

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        for i in range(2):  # warm-up (first-request costs are not throughput)
            await _one(client, url, model, i, max_tokens, stream)

        async def worker() -> None:
            while queue:
                i = queue.pop()
                results.append(await _one(client, url, model, i, max_tokens, stream))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    lat = sorted(r[0] for r in results)
    return {
        "rps": n / wall,
        "tok_s": sum(r[2] for r in results) / wall,
        "p50": statistics.median(lat),
        "p99": lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "ttft_p50": statistics.median(r[1] for r in results),
    }


def _vllm_python() -> str:
    from hone.runtime import vllm_python

    return vllm_python() or sys.executable


def _bare_vllm(model: str, served: str) -> tuple[subprocess.Popen, str]:
    """vLLM's own OpenAI server, with the settings hone's engine: vllm uses on CPU."""
    from hone import assets

    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [_vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(assets.resolve_model(model)), "--served-model-name",
         served, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}"


def _measure(name: str, url: str, served: str, levels: list[int], stream: bool = True,
             least: int = 16) -> list[tuple[str, int, dict[str, float]]]:
    """One server loaded with every workload of :data:`RUNS` at each concurrency; rows named ``server · workload``."""
    global PROMPTS
    rows = []
    for workload, max_tokens in RUNS:
        PROMPTS = WORKLOADS[workload]
        for c in levels:
            rows.append((f"{name} · {workload}", c,
                         asyncio.run(_load(url + "/v1/completions", served, c, max(least, 2 * c), max_tokens, stream=stream))))
            print(f"{rows[-1][0]} c={c}: {rows[-1][2]}", flush=True)
    return rows


def _vllm_rows(model: str, served: str, levels: list[int], tmp: Path, proxy: str = "ray") -> list[tuple[str, int, dict[str, float]]]:
    rows = []
    for name in ("bare vLLM", "hone serve engine vllm"):
        proc, url = _bare_vllm(model, served) if name == "bare vLLM" else _hone_server(model, "none", tmp, engine="vllm", proxy=proxy)
        try:
            rows += _measure(name, url, served, levels)
        finally:
            _stop(proc)
    return rows


def _lora_rows(model: str, levels: list[int], tmp: Path, proxy: str) -> list[tuple[str, int, dict[str, float]]]:
    """A LoRA adapter (r=8 on q/v, random non-zero weights) served by vLLM as a LoRA on the base, against the same
    adapter merged into the base (what ``merge_adapter: true`` serves), both with engine: vllm."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone import assets

    torch.manual_seed(0)
    path = assets.resolve_model(model)
    lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                               peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp / "lora")
    lora.merge_and_unload().save_pretrained(tmp / "merged")
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp / "merged")
    rows = []
    for name, target, extra in (("engine vllm, LoRA on the base", model, {"adapters": {"lora": str(tmp / "lora")}}),
                                ("engine vllm, adapter merged", str(tmp / "merged"), {})):
        proc, url = _hone_server(target, "none", tmp, engine="vllm", proxy=proxy, extra=extra)
        try:
            rows += _measure(name, url, "lora" if extra else "merged", levels)
        finally:
            _stop(proc)
    return rows


def _vllm_ratios(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    by = {(n, c): r for n, c, r in rows}
    lines = []
    for (n, c), bare in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        server, _, workload = n.partition(" · ")
        hone = by.get((f"hone serve engine vllm · {workload}", c))
        if server == "bare vLLM" and hone:
            lines.append(f"{workload:9} engine vllm / bare vLLM at {c} concurrent: req/s {hone['rps'] / bare['rps']:.2f}x "
                         f"(target >= 0.97x), p50 {hone['p50'] / bare['p50']:.2f}x (target <= 1.05x)")
    return "\n".join(lines)


def _hone_server(
    model: str, quantization: str, tmp: Path, allow_failed_gate: bool = False, proxy: str = "ray", engine: str = "transformers",
    extra: dict | None = None,
) -> tuple[subprocess.Popen, str]:
    import yaml

    port = _free_port()
    cfg = {
        "name": "bench",
        "model": model,
        "quantization": quantization,
        "port": port,
        "metrics_export_port": _free_port(),
        "num_replicas": 1,
        "max_batch_size": 32,
        "max_ongoing_requests": 64,
        "proxy": proxy,
        "max_queued_requests": 512,
        "ray_actor_options": {"num_cpus": os.cpu_count() or 2},
        "allow_failed_gate": allow_failed_gate,
        "engine": engine,
    }  # the benchmark measures speed whatever the gate said
    if engine == "vllm":
        cfg.pop("max_batch_size")  # vLLM schedules its own batches
        cfg["served_model_name"] = Path(model.removeprefix("builtin:")).name
    cfg.update(extra or {})
    path = tmp / f"serve-{quantization}-{proxy}-{engine}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "HONE_API_KEYS")}
    proc = subprocess.Popen(
        [HONE, "serve", str(path)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    _wait(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}"


FLOOR = textwrap.dedent("""
    import signal, sys, time
    import ray
    from fastapi import FastAPI, Request
    from ray import serve
    app = FastAPI()
    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    class Model:
        async def complete(self, body):
            return {"text": " positive", "finish_reason": "length", "completion_tokens": 1, "prompt_tokens": 20}
    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(app)
    class Ingress:
        def __init__(self, model):
            self.model = model
        @app.get("/health")
        async def health(self):
            return {"status": "ok"}
        @app.post("/v1/completions")
        async def completions(self, request: Request):
            body = await request.json()
            out = await self.model.complete.remote(body)
            return {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "text": out["text"], "logprobs": None, "finish_reason": out["finish_reason"]}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": 1, "total_tokens": 21}}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[1])})
    serve.run(Ingress.bind(Model.bind()), name="floor", route_prefix="/")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:  # its own Ray (and HAProxy) go with it
        serve.shutdown()
        ray.shutdown()
""")

PACE_S = 0.01  # one engine call per 10 ms: requests that reach a replica one at a time find its caches cold


def _engine_p50(model: str, reps: int, pace_s: float = 0.0) -> float:
    """p50 of a 1-token request on the engine in-process: back to back, or one call every ``pace_s`` (idle between)."""
    from hone.config import validate_serve_config
    from hone.generation import Sampling
    from hone.serving.engine import Engine, GenRequest
    from hone.serving.spec import resolve

    engine = Engine(resolve(validate_serve_config({"model": model, "device": "cpu"})))
    ids = engine.encode_prompt(PROMPTS[0], None)
    times = []
    for _ in range(reps + 2):
        if pace_s:
            time.sleep(pace_s)
        started = time.perf_counter()
        engine.generate_batch([GenRequest(ids, Sampling(max_tokens=1, temperature=0))], lambda *a: None)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def _http_p50(url: str, model: str, reps: int, stream: bool = False) -> float:
    import httpx

    times = []
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0, "stream": stream}
    with httpx.Client(timeout=60) as client:
        for _ in range(reps + 5):
            started = time.perf_counter()
            if stream:
                with client.stream("POST", url + "/v1/completions", json=body) as r:
                    r.raise_for_status()
                    for _ in r.iter_lines():
                        pass
            else:
                client.post(url + "/v1/completions", json=body).raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times[5:])


def _floor_p50(model: str, reps: int, tmp: Path, proxy: str) -> float:
    """Ray Serve's own floor: the request through an empty application of hone's shape, behind ``proxy``."""
    from hone.config import validate_serve_config
    from hone.serving.runner import reap_haproxy, session_env

    port = _free_port()
    script = tmp / "floor.py"
    script.write_text(FLOOR)
    flags = session_env(validate_serve_config({"model": model, "proxy": proxy}))
    flags.pop("OMP_NUM_THREADS")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **flags}
    floor = subprocess.Popen(
        [sys.executable, str(script), str(port)], env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait(f"http://127.0.0.1:{port}/health", floor)
        return _http_p50(f"http://127.0.0.1:{port}", model.removeprefix("builtin:"), reps)
    finally:
        _stop(floor)
        if "RAY_SERVE_HAPROXY_STATS_PORT" in flags:
            reap_haproxy(flags)


def _overhead(model: str, reps: int, tmp: Path) -> dict[str, float]:
    """p50 seconds of a 1-token request: the engine in-process (back to back and paced), then per HTTP front
    (Ray Serve's proxy, HAProxy) Ray Serve's floor and hone over HTTP, plain and streamed."""
    served = model.removeprefix("builtin:")
    out = {"engine": _engine_p50(model, reps), "engine_paced": _engine_p50(model, reps, PACE_S)}
    for proxy in ("ray", "haproxy"):
        out[f"floor_{proxy}"] = _floor_p50(model, reps, tmp, proxy)
        hone, url = _hone_server(model, "none", tmp, proxy=proxy)
        try:
            out[f"http_{proxy}"] = _http_p50(url, served, reps)
            out[f"stream_{proxy}"] = _http_p50(url, served, reps, stream=True)
        finally:
            _stop(hone)
    return out


def _overhead_line(model: str, o: dict[str, float]) -> str:
    ms = {k: v * 1000 for k, v in o.items()}
    lines = [
        f"Serve layer overhead ({model}, p50 of a 1-token request; target <= 3 ms over the engine): engine in-process "
        f"{ms['engine']:.1f} ms back to back, {ms['engine_paced']:.1f} ms called once per {PACE_S * 1000:.0f} ms"
    ]
    for proxy in ("ray", "haproxy"):
        http, floor = ms[f"http_{proxy}"], ms[f"floor_{proxy}"]
        lines.append(
            f"  proxy {proxy:8} HTTP {http:.1f} ms (streamed {ms[f'stream_{proxy}']:.1f}) = +{http - ms['engine']:.1f} ms over "
            f"the engine; Ray Serve's floor (empty app of the same shape) {floor:.1f} ms; hone's own code "
            f"{http - floor - ms['engine_paced']:+.1f} ms beyond floor + paced engine"
        )
    return "\n".join(lines)


def _table(args: argparse.Namespace, rows: list[tuple[str, int, dict[str, float]]]) -> None:
    runs = ", ".join(f"{w} (max_tokens {m})" for w, m in RUNS)
    print(f"\n{args.model}, workloads {runs}, greedy; {os.cpu_count()} CPUs\n")
    print("| server | concurrency | req/s | tokens/s | p50 s | p99 s | TTFT p50 s |\n|---|---|---|---|---|---|---|")
    for name, c, r in rows:
        print(f"| {name} | {c} | {r['rps']:.2f} | {r['tok_s']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['ttft_p50']:.2f} |")


def _mask_output(args: argparse.Namespace) -> int:
    """``mask_pii: output`` against the same server without it, streamed story answers, in one run."""
    from machine import cpu_flags  # bench/machine.py

    global PROMPTS, RUNS
    RUNS = [("story", args.max_tokens or 128)]
    PROMPTS = WORKLOADS["story"]
    levels = [int(x) for x in args.levels.split(",")]
    engine = args.engines.split(",")[0]
    served = Path(args.model.removeprefix("builtin:")).name
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        for name, extra in (("answers as generated", {}), ("mask_pii: output", {"mask_pii": "output"})):
            folder = Path(tmp_dir) / ("masked" if extra else "plain")
            folder.mkdir()
            proc, url = _hone_server(args.model, "none", folder, engine=engine, extra=extra)
            try:
                rows += _measure(f"hone serve {engine} · {name}", url, served, levels, least=16)
            finally:
                _stop(proc)
    _table(args, rows)
    print(f"CPU: {os.cpu_count()} cores, {cpu_flags()}")
    half = len(rows) // 2
    for (_, c, plain), (_, _, masked) in zip(rows[:half], rows[half:], strict=True):
        print(f"c={c}: masked/plain requests/s {masked['rps'] / plain['rps']:.3f}x, p50 {masked['p50'] / plain['p50']:.3f}x, "
              f"time to first text p50 {masked['ttft_p50']:.2f} s against {plain['ttft_p50']:.2f} s")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=None, help="answer length of every workload (default: story 48, sentiment 16)")
    parser.add_argument("--quantization", default="int8-dynamic")
    parser.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both",
                        help="story: long answers (decode-bound); sentiment: a label (prefill-bound); both (default)")
    parser.add_argument("--skip-baseline", action="store_true", help="only the hone rows (re-runs)")
    parser.add_argument("--overhead-model", default="builtin:tiny-llama", help="model for the Serve-overhead line")
    parser.add_argument("--overhead-reps", type=int, default=200)
    parser.add_argument("--overhead-only", action="store_true", help="only the Serve-overhead line")
    parser.add_argument("--engines", default="transformers,vllm", help="hone engines to load (vllm adds bare vLLM as its baseline)")
    parser.add_argument("--vllm-only", action="store_true", help="only bare vLLM against hone's engine: vllm")
    parser.add_argument("--vllm-lora", action="store_true", help="only a LoRA served by vLLM against the same adapter merged")
    parser.add_argument("--proxy", choices=["ray", "haproxy"], default="ray", help="hone serve's HTTP front (fp32 rows of both engines)")
    parser.add_argument("--mask-output", action="store_true", help="only mask_pii: output against the same server without it")
    args = parser.parse_args()
    global PROMPTS, RUNS
    if args.mask_output:
        return _mask_output(args)
    RUNS = [(w, args.max_tokens or ANSWER_TOKENS[w]) for w in (("story", "sentiment") if args.workload == "both" else (args.workload,))]
    PROMPTS = WORKLOADS[RUNS[-1][0]]
    levels = [int(x) for x in args.levels.split(",")]
    served = args.model.removeprefix("builtin:")
    rows: list[tuple[str, int, dict[str, float]]] = []
    if args.overhead_only:
        with tempfile.TemporaryDirectory() as tmp_dir:
            print(_overhead_line(args.overhead_model, _overhead(args.overhead_model, args.overhead_reps, Path(tmp_dir))))
        return 0
    if args.vllm_lora:
        with tempfile.TemporaryDirectory() as tmp_dir:
            rows = _lora_rows(args.model, levels, Path(tmp_dir), args.proxy)
        _table(args, rows)
        return 0
    if args.vllm_only:
        with tempfile.TemporaryDirectory() as tmp_dir:
            rows = _vllm_rows(args.model, served, levels, Path(tmp_dir), args.proxy)
        _table(args, rows)
        print(_vllm_ratios(rows))
        return 0

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        port = _free_port()
        script = tmp / "baseline.py"
        script.write_text(BASELINE)
        base = subprocess.Popen(
            [sys.executable, str(script), args.model, str(port)],
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait(f"http://127.0.0.1:{port}/health", base)
            if not args.skip_baseline:
                rows += _measure("baseline (uvicorn + generate)", f"http://127.0.0.1:{port}", served, levels, stream=False, least=8)
        finally:
            _stop(base)

        hone, url = _hone_server(args.model, "none", tmp, proxy=args.proxy)
        try:
            rows += _measure("hone serve fp32", url, served, levels, least=8)
        finally:
            _stop(hone)
        if "vllm" in args.engines.split(","):
            rows += _vllm_rows(args.model, served, levels, tmp, args.proxy)
        overhead = _overhead(args.overhead_model, args.overhead_reps, tmp)
        print(_overhead_line(args.overhead_model, overhead), flush=True)

        quant_info = None
        if args.quantization != "none":
            from hone.artifacts import QUANTIZED_INFO, quantized_dir, resolve_ref

            artifact = quantized_dir(resolve_ref(args.model), args.quantization)
            if not (artifact / QUANTIZED_INFO).exists():
                subprocess.run([HONE, "quantize", args.model, "--method", args.quantization])  # exit 3: gate failed, still measured
            quant_info = json.loads((artifact / QUANTIZED_INFO).read_text())["gate"]
            hone_q, url_q = _hone_server(args.model, args.quantization, tmp, allow_failed_gate=True)
            try:
                rows += _measure(f"hone serve {args.quantization}", url_q, served, [8 if 8 in levels else levels[-1]], least=8)
            finally:
                _stop(hone_q)

    _table(args, rows)
    if any("vLLM" in n for n, _, _ in rows):
        print(_vllm_ratios(rows))
    by = {(n.split()[0], n.partition(" · ")[2], c): r for n, c, r in rows
          if "int8" not in n and "weight" not in n and "vllm" not in n.lower()}
    top = max(levels)
    for workload, _ in RUNS:
        if ("baseline", workload, top) in by and ("hone", workload, top) in by:
            ratio = by[("hone", workload, top)]["tok_s"] / by[("baseline", workload, top)]["tok_s"]
            print(f"\n{workload}: throughput at {top} concurrent: hone / baseline = {ratio:.2f}x (target >= 3x)")
    print(_overhead_line(args.overhead_model, overhead))
    if quant_info:
        o, q = quant_info["original"], quant_info["quantized"]
        print(f"\nfp32 vs {args.quantization} (quality gate: {quant_info['rule']}):")
        for key in ("eval_loss", "size_mb", "peak_rss_mb", "decode_ms_per_token"):
            print(f"  {key:20} {o[key]:10.3f} {q[key]:10.3f}  ({q[key] / o[key]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
