"""A hone serve process for the serving tests: start it from a serve YAML, stop it as a service manager would,
and look inside it (replica states, per-replica stats, Prometheus text)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

HONE = str(Path(sys.executable).parent / "hone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cfg: dict, tmp: Path, env_extra: dict[str, str] | None = None):
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ready = tmp / "ready.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra or {})
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen([HONE, "serve", str(path), "--ready-file", str(ready)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not ready.exists():
        if proc.poll() is not None or time.time() > deadline:
            stop(proc)
            pytest.fail("hone serve did not come up:\n" + (tmp / "serve.log").read_text()[-5000:])
        time.sleep(0.5)
    return proc, yaml.safe_load(ready.read_text())


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to hone serve, as Kubernetes or systemd stop a service; the whole group is killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def metrics(port: int, ready, timeout: float = 60.0) -> dict[str, list]:
    """Scrape Ray's metrics export port (parsed Prometheus text) until ``ready(samples)`` holds.

    Ray exports metrics every ~10 s, so fresh observations take a while to appear.
    """
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.time() + timeout
    while True:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            text = ""
        families: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                families.setdefault(sample.name, []).append(sample)
        if ready(families) or time.time() > deadline:
            return families
        time.sleep(1)


def haproxy_configs() -> list[str]:
    """Config files of the HAProxy processes running on this machine."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if entry.name.isdigit() and argv[0].endswith(b"haproxy") and b"-f" in argv:
                found.append(Path(argv[argv.index(b"-f") + 1].decode()).read_text())
        except (OSError, IndexError):
            continue
    return found


def replicas(ray_address: str, app: str) -> int:
    code = (f"import ray, json; from ray import serve; ray.init(address={ray_address!r}, logging_level='ERROR', log_to_driver=False);"
            f"s = serve.status().applications[{app!r}].deployments['ModelServer'];"
            "print(json.dumps(s.replica_states))")
    # hone serve's embedded Ray uses Ray's default token auth (token in ~/.ray/auth_token)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "token"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    states = json.loads(out.stdout.strip().splitlines()[-1])
    return int(states.get("RUNNING", 0))




class ReplicaMonitor:
    """Samples ``ModelServer.stats()`` (requests decoding and waiting) of an application every 0.1 s, from a Ray driver
    attached to hone serve's cluster: ``samples`` is a list of {"t", "running", "waiting"}."""

    CODE = """
import json, sys, time, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
handle = serve.get_deployment_handle("ModelServer", sys.argv[2])
while True:
    print(json.dumps({"t": time.time(), **handle.stats.remote().result()}), flush=True)
    time.sleep(0.1)
"""

    def __init__(self, ray_address: str, app: str):
        import threading

        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "token"}
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, ray_address, app], stdout=subprocess.PIPE, text=True, env=env)
        self.samples: list[dict] = []
        threading.Thread(target=lambda: [self.samples.append(json.loads(line)) for line in self.proc.stdout], daemon=True).start()
        self.wait_for(lambda s: True, "the first sample", timeout=120)

    def wait_for(self, condition, what: str, timeout: float = 30.0, after: float = 0.0) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for sample in reversed(self.samples):
                if sample["t"] >= after and condition(sample):
                    return sample
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; last samples {self.samples[-3:]}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def model_replica_pids(app: str) -> list[int]:
    """PIDs of the application's ModelServer replica processes (their process title names them)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or [""]
        if argv and argv[0].startswith(f"ray::ServeReplica:{app}:ModelServer"):
            found.append(p.pid)
    return found


# The reliability issue's malformed requests (7 of 18 used to get a 500), and the parameters an engine does not implement
# (refused with 400 instead of being ignored): (route, body, status, param).
SUPPORTED = {"transformers": ("response_format",), "vllm": ("logprobs", "response_format", "n")}


def malformed(model: str, engine: str = "transformers") -> list[tuple[str, dict | bytes, int, str | None]]:
    MODEL, m = model, model.encode()
    cases = [
        ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 2**64}, 400, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": -(2**64)}, 400, "seed"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop"),
        ("/v1/completions", b'{"model": "' + m + b'", "prompt": "lone \\ud800 surrogate"}', 400, "prompt"),
        ("/v1/completions", b'{"model": "' + m + b'", "prompt": "x", "temperature": NaN}', 400, None),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"50": -100}}, 400, "logit_bias"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "made_up": 1}, 400, "made_up"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "lots"}, 400, "max_tokens"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
         400, "messages.0.content.0.text"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                                    "image_url": {"url": "x"}}]}]},
         400, "messages.0.content.0.type"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2},
         400, "logprobs"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_object"}}, 400, "response_format"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n"),
        ("/v1/chat/completions", b"[" * 50_000 + b"]" * 50_000, 400, None),
        ("/v1/completions", b'{"model": "' + m + b'", "prompt": "' + b"a" * 1_100_000 + b'"}', 413, None),
    ]
    return [case for case in cases if case[3] not in SUPPORTED[engine]]
