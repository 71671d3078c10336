"""What the tests share: the ``hone`` command as a user runs it, waiting for events, a run's records, and ``hone serve``
processes with a look inside them (replica states and processes, per-replica stats, Prometheus text).

Every wait here waits for an event (a record, a file, a state, a log line) with a generous bound, never for a fixed time.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from hone.artifacts import METRICS_FILE, parse_metrics, read_metrics
from hone.runtime import free_port

__all__ = ["HONE", "RAY", "REPO", "ServeProbe", "cluster_state", "free_port", "haproxy_configs", "hone", "kill_run",
           "killed_after_step", "logged_step", "losses", "make_job", "malformed", "metrics", "model_replica_pids", "only_run",
           "read_metrics", "records", "run_dirs", "start_hone", "start_server", "stop_group", "stop_server", "train_worker_pids",
           "wait_cluster_idle", "wait_until"]

REPO = Path(__file__).resolve().parents[1]
HONE = str(Path(sys.executable).parent / "hone")
RAY = str(Path(sys.executable).parent / "ray")


def make_job(**sections):
    """A valid tiny job with some sections replaced (dicts are merged one level deep)."""
    from hone.config import validate_job

    raw = {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return validate_job(raw)


def private_home(tmp: Path, mp: pytest.MonkeyPatch) -> Path:
    """A private registry (HONE_HOME/mlflow) under ``tmp`` while keeping the shared built-in model cache; exports under
    ``tmp`` are model roots (the operator lists them)."""
    registry_home = tmp / "home"
    (registry_home / "models").mkdir(parents=True)
    shared = Path(os.environ["HONE_HOME"]) / "models"
    shared.mkdir(parents=True, exist_ok=True)
    for built in shared.iterdir():
        (registry_home / "models" / built.name).symlink_to(built)
    mp.setenv("HONE_HOME", str(registry_home))
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setenv("HONE_MODEL_ROOTS", str(tmp))
    return registry_home


# --------------------------------------------------------------------------- the hone command


def _env(env: dict[str, str] | None) -> dict[str, str]:
    return dict(os.environ if env is None else env)


def hone(*args: str, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None,
         check: bool = False) -> subprocess.CompletedProcess:
    """``hone ARGS`` in its own process group, output captured; past ``timeout`` the whole group is killed and the test fails
    with what it printed. ``check``: fail unless it exits 0."""
    proc = subprocess.Popen([HONE, *args], env=_env(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hone {' '.join(args[:2])} timed out after {timeout:.0f} s\n--- stdout\n{out[-6000:]}\n--- stderr\n{err[-6000:]}")
    done = subprocess.CompletedProcess([HONE, *args], proc.returncode, out, err)
    if check:
        assert done.returncode == 0, f"hone {' '.join(args[:2])} exited {done.returncode}\n{out[-4000:]}\n{err[-4000:]}"
    return done


def start_hone(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """``hone ARGS`` running in the background in its own process group (output to ``log``, or a pipe)."""
    out = open(log, "w") if log is not None else subprocess.PIPE
    return subprocess.Popen([HONE, *args], env=_env(env), stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal a process started by :func:`start_hone` and everything it started; wait for it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    proc.wait()


def wait_until(condition: Any, what: str, timeout: float = 300, proc: subprocess.Popen | None = None, log: Path | None = None,
               every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something true (returned); fail after ``timeout`` or when ``proc`` ends first,
    with the end of ``log``."""
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        tail = ("\n" + log.read_text()[-4000:]) if log is not None and log.exists() else ""
        if proc is not None and proc.poll() is not None:
            value = condition()  # its last record may have landed as it exited
            if value:
                return value
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}{tail}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(every)


# --------------------------------------------------------------------------- runs and their records


def run_dirs(storage: Path) -> list[Path]:
    """The run (or sweep) folders in a storage path, oldest first (not the data cache or other dot folders)."""
    if not storage.is_dir():
        return []
    return sorted((p for p in storage.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def only_run(storage: Path) -> Path:
    found = run_dirs(storage)
    assert len(found) == 1, found
    return found[0]


def records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl as logged (:func:`read_metrics` keeps one per step: the last)."""
    path = Path(run_dir) / METRICS_FILE
    return parse_metrics(path.read_text()) if path.exists() else []


def losses(run_dir: Path) -> dict[int, list[float]]:
    """Every loss logged for each step, in order: a step computed again after a restart or a resume is logged again."""
    return step_losses(records(run_dir))


def step_losses(logged: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Records (as :func:`records` or ``parse_metrics`` return them) → every loss logged for each step, in order."""
    out: dict[int, list[float]] = {}
    for m in logged:
        out.setdefault(int(m["step"]), []).append(m["loss"])
    return out


def logged_step(run_dir: Path, step: int) -> bool:
    return any(m["step"] >= step for m in read_metrics(run_dir))


def train_worker_pids(address: str) -> list[int]:
    """The processes of the Ray Train workers alive on the cluster at ``address`` (named: another Ray may train on this
    machine meanwhile, the other lane of ``make test``). Every node of the test cluster is on this machine."""
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]


def cluster_state(address: str) -> str:
    """What holds the cluster at ``address`` (for a failure's message): ``ray status -v``, live actors, placement groups."""
    from ray.util.state import list_actors, list_placement_groups

    status = subprocess.run([RAY, "status", "-v", "--address", address], capture_output=True,
                            text=True, timeout=60)
    actors = [(a.class_name, a.node_id[:8], a.pid, a.job_id) for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])]
    groups = [(g.placement_group_id[:8], g.state, g.bundles) for g in list_placement_groups(address=address, detail=True)
              if g.state != "REMOVED"]
    return f"{status.stdout}{status.stderr}\nalive actors: {actors}\nplacement groups: {groups}"


def cluster_cpus_in_use(address: str) -> float:
    """The CPUs that something holds on the cluster at ``address`` (``ray status``'s usage)."""
    out = subprocess.run([RAY, "status", "--address", address], capture_output=True,
                         text=True, timeout=60).stdout
    used = re.search(r"^\s*([\d.]+)/([\d.]+) CPU\b", out, re.M)
    assert used, out
    return float(used.group(1))


def wait_cluster_idle(address: str, timeout: float = 300) -> None:
    """Wait until nothing holds a CPU on the cluster at ``address`` (a run that ended frees its workers' placement group
    once Ray has noticed), or fail with what holds it."""
    deadline = time.time() + timeout
    while cluster_cpus_in_use(address) > 0:
        if time.time() > deadline:
            pytest.fail(f"the cluster is still busy after {timeout:.0f} s:\n{cluster_state(address)}")
        time.sleep(1)


def kill_run(proc: subprocess.Popen, worker_pids: list[int]) -> None:
    """A crash of a whole run: SIGKILL to ``hone train``'s process group and to its Ray Train workers at once. Killing the
    driver alone is not enough to stop the run at a known step: Ray stops its workers only once it has noticed the
    driver is gone, and meanwhile they may compute, log and checkpoint another step."""
    stop_group(proc)
    for pid in worker_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def killed_after_step(step: int, address: str, job: Path, storage: Path, env: dict, *overrides: str) -> Path:
    """Start ``hone train`` on the job on the cluster at ``address`` and, once ``step`` (> 1) is logged, kill it with its
    workers (:func:`kill_run`): the run's last record is ``step``'s. Returns the run."""
    assert step > 1, "the workers are found once step 1 is logged"
    storage.mkdir(parents=True, exist_ok=True)
    log = storage.parent / f"{storage.name}-killed.log"
    proc = start_hone("train", str(job), *overrides, "--address", address, "--storage-path", str(storage), env=env, log=log)
    pids: list[int] = []
    try:
        run_dir = wait_until(lambda: next(iter(run_dirs(storage)), None), "the run directory", timeout=300, proc=proc, log=log)
        wait_until(lambda: logged_step(run_dir, 1), "step 1", proc=proc, log=log)
        pids = wait_until(lambda: train_worker_pids(address), "the run's Ray Train workers", proc=proc, log=log)
        wait_until(lambda: logged_step(run_dir, step), f"step {step}", proc=proc, log=log)
    finally:
        kill_run(proc, pids)
    return run_dir


# --------------------------------------------------------------------------- hone serve


def start_server(cfg: dict, tmp: Path, env_extra: dict[str, str] | None = None, timeout: float = 300,
                 args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, dict]:
    """``hone serve`` on a serve YAML written from ``cfg``, in the background; returns it and its ready file's contents.

    Ray exports metrics every second (its floor) in these servers, so a test waits about a second for a counter.
    Without an ``engine`` the server runs hone's engine (the tests of vLLM's replicas say ``engine: vllm``)."""
    path = tmp / "serve.yaml"
    path.write_text(yaml.safe_dump({"engine": "transformers", **cfg}))
    ready = tmp / "ready.yaml"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_metrics_report_interval_ms"] = "1000"
    env.update(env_extra or {})
    log = tmp / "serve.log"
    proc = start_hone("serve", str(path), "--ready-file", str(ready), *args, env=env, log=log)
    try:
        wait_until(ready.exists, "hone serve to come up", timeout=timeout, proc=proc, log=log, every=0.2)
    except BaseException:
        stop_server(proc)
        raise
    return proc, yaml.safe_load(ready.read_text())


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM to hone serve, as Kubernetes or systemd stop a service; the whole group is killed if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_group(proc)


def metrics(port: int, ready: Any, timeout: float = 60.0) -> dict[str, list]:
    """Scrape Ray's metrics export port (parsed Prometheus text) until ``ready(samples)`` holds (or the bound passes: the
    caller asserts on what came back)."""
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
        time.sleep(0.25)


def listen_addresses(port: int) -> set[str]:
    """The IPv4 addresses something listens on at ``port`` on this machine (``/proc/net/tcp``)."""
    import ipaddress

    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, hex_port = fields[1].split(":")
        if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
            found.add(str(ipaddress.IPv4Address(bytes.fromhex(address)[::-1])))
    return found


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


def model_replica_pids(app: str) -> list[int]:
    """PIDs of the application's ModelServer replica processes (their process title names them)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or [""]
        if argv and argv[0].startswith(f"ray::ServeReplica:{app}:ModelServer"):
            found.append(p.pid)
    return found


class ServeProbe:
    """One long-lived Ray driver attached to a hone serve's cluster, asked over a pipe: the model deployment's replica
    states, its replicas' processes by replica id, and (:meth:`watch`) ``ModelServer.stats()`` sampled every 0.1 s."""

    CODE = r"""
import json, sys, threading, time, ray
from ray import serve
from ray.util.state import list_actors
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
lock = threading.Lock()
def say(obj):
    with lock:
        print(json.dumps(obj), flush=True)
def watch(app):
    handle = serve.get_deployment_handle("ModelServer", app)
    while True:
        say({"sample": {"t": time.time(), **handle.stats.remote().result()}})
        time.sleep(0.1)
say({"reply": "ready"})
for line in sys.stdin:
    ask = json.loads(line)
    try:
        if ask["op"] == "states":
            out = serve.status().applications[ask["app"]].deployments["ModelServer"].replica_states
        elif ask["op"] == "pids":
            prefix = f"SERVE_REPLICA::{ask['app']}#ModelServer#"
            out = {a.name[len(prefix):]: a.pid for a in list_actors(address=sys.argv[1], filters=[("state", "=", "ALIVE")], limit=1000)
                   if (a.name or "").startswith(prefix)}
        elif ask["op"] == "watch":
            threading.Thread(target=watch, args=(ask["app"],), daemon=True).start()
            out = "watching"
        say({"reply": out})
    except Exception as e:
        say({"error": repr(e)})
"""

    def __init__(self, ray_address: str, app: str):
        # hone serve's embedded Ray uses Ray's default token auth (token in ~/.ray/auth_token)
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE") or "token",
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # its node address is 127.0.0.1, like the server's (metrics_host)
        self.app = app
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, ray_address], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.samples: list[dict] = []
        self._replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._reply(120) == "ready"

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "sample" in msg:
                self.samples.append(msg["sample"])
            else:
                self._replies.put(msg)

    def _reply(self, timeout: float) -> Any:
        try:
            msg = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the serve probe did not answer in {timeout:.0f} s (exit {self.proc.poll()})") from None
        assert "error" not in msg, msg["error"]
        return msg["reply"]

    def ask(self, op: str, timeout: float = 60) -> Any:
        self.proc.stdin.write(json.dumps({"op": op, "app": self.app}) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def running(self) -> int:
        """The model deployment's RUNNING replicas."""
        return int(self.ask("states").get("RUNNING", 0))

    def wait_running(self, n: int, timeout: float = 120) -> None:
        wait_until(lambda: self.running() == n, f"{n} running replicas of {self.app}", timeout=timeout, every=0.5)

    def replica_pids(self) -> dict[str, int]:
        """{replica id (the X-Hone-Replica header): process id} of the live model replicas."""
        return {k: int(v) for k, v in self.ask("pids").items()}

    def watch(self) -> None:
        """Start sampling ``ModelServer.stats()`` into :attr:`samples` and wait for the first sample."""
        self.ask("watch")
        self.wait_for(lambda s: True, "the first sample", timeout=120)

    def wait_for(self, condition: Any, what: str, timeout: float = 30.0, after: float = 0.0) -> dict:
        def hit() -> dict | None:
            return next((s for s in reversed(self.samples) if s["t"] >= after and condition(s)), None)

        try:
            return wait_until(hit, what, timeout=timeout)
        except pytest.fail.Exception as e:
            raise AssertionError(f"{e}; last samples {self.samples[-3:]}") from None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# The reliability issue's malformed requests (7 of 18 used to get a 500), and the parameters an engine does not implement
# (refused with 400 instead of being ignored): (route, body, status, param).
SUPPORTED = {"transformers": ("response_format",), "vllm": ("logprobs", "response_format", "n")}


def malformed(model: str, engine: str = "transformers",
              max_request_bytes: int | None = None) -> list[tuple[str, dict | bytes, int, str | None]]:
    """Requests each server must refuse; the 413 case is just over ``max_request_bytes`` (the serve schema's default)."""
    from hone.config import ServeConfig

    limit = max_request_bytes or ServeConfig.model_fields["max_request_bytes"].default
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
        ("/v1/completions", b'{"model": "' + m + b'", "prompt": "' + b"a" * (limit + 50_000) + b'"}', 413, None),
    ]
    return [case for case in cases if case[3] not in SUPPORTED[engine]]


# --------------------------------------------------------------------------- exports


def reload_eval(export: Path, job) -> dict:
    """Load an export with plain transformers/peft (no Ray, no DeepSpeed) and evaluate."""
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hone.data import prepare_data
    from hone.modeling import evaluate, load_base_model

    tokenizer = AutoTokenizer.from_pretrained(export)
    prepared = prepare_data(job, tokenizer)
    info = json.loads((export / "hone.json").read_text())
    if info["kind"] == "adapter":
        model = peft.PeftModel.from_pretrained(load_base_model(job), str(export))
    elif job.task.type == "sequence_classification":
        model = AutoModelForSequenceClassification.from_pretrained(export)
    else:
        model = AutoModelForCausalLM.from_pretrained(export)
    return evaluate(model, list(prepared.validation), job, tokenizer.pad_token_id, batch_size=5)


def check_full_weights(export: Path, base) -> None:
    import torch
    from transformers import AutoModel

    exported = AutoModel.from_pretrained(export)
    body = getattr(base, base.base_model_prefix, base)
    changed = [n for (n, a), (_, b) in zip(body.named_parameters(), exported.named_parameters()) if not torch.equal(a, b)]
    assert len(changed) > 10, "full fine-tuning must change the weights"
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in body.parameters())
