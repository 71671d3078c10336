"""``hone serve``: deploy a serve YAML on Ray Serve and keep serving until stopped."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from hone.config import ServeConfig
from hone.runtime import dashboard_url, free_port, is_remote, port_in_use, ray_session, stop_event
from hone.serving.spec import ServeSpec

__all__ = ["cpus_needed", "haproxy_folder", "reap_haproxy", "serve", "serve_config_document", "session_env", "serving_session"]


def serve_config_document(cfg: ServeConfig) -> dict[str, Any]:
    """The plain Ray Serve config (``serve deploy`` / KubeRay ``serveConfigV2``) running this serve YAML."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": cfg.port},
        "applications": [{
            "name": cfg.name,
            "route_prefix": cfg.route_prefix,
            "import_path": "hone.serving.app:build_app",
            "args": {"config": cfg.to_dict()},
        }],
    }


@contextlib.contextmanager
def serving_session(cfg: ServeConfig, job: Any, address: str | None, extra_cpus: float) -> Iterator[None]:
    """The Ray session a serve config runs in (``hone.runtime.ray_session`` with :func:`session_env`).

    With ``proxy: haproxy`` on a local Ray, the HAProxy process Ray Serve started is stopped on the way
    out even when Ray itself went down first (a signal to the whole process group), so it never keeps
    holding the service's port.
    """
    local = not is_remote(address)
    if cfg.proxy == "haproxy" and not local:
        print("[hone] proxy: haproxy applies to the Ray that hone serve starts; on a cluster, start Ray with "
              "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in its environment", flush=True)
    env = session_env(cfg)
    try:
        with ray_session(job, address, extra_cpus=extra_cpus, env=env, metrics_export_port=cfg.metrics_export_port,
                         loopback=cfg.metrics_host == "127.0.0.1"):
            yield
    finally:
        if "RAY_SERVE_HAPROXY_STATS_PORT" in env and local:
            reap_haproxy(env)


def haproxy_folder(stats_port: str) -> Path:
    """The folder of one server's HAProxy config, admin socket and state (``/tmp``: a socket path has at most 107 bytes;
    per user and per stats port, so two servers never share it). hone made it, so hone deletes it."""
    return Path(tempfile.gettempdir()) / f"hone-haproxy-{os.getuid()}-{stats_port}"


def reap_haproxy(env: dict[str, str], wait_s: float = 10.0) -> None:
    """Stop the HAProxy processes of the session ``env`` describes (:func:`session_env`: their config lies in its own
    folder), wait for them, and delete that folder: only what hone created."""
    folder = haproxy_folder(env["RAY_SERVE_HAPROXY_STATS_PORT"])
    proc = Path("/proc")
    pids = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if not argv[0].endswith(b"haproxy") or b"-f" not in argv:
                continue
            if Path(argv[argv.index(b"-f") + 1].decode()).is_relative_to(folder):
                os.kill(int(entry.name), signal.SIGTERM)
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile, or not ours to read
    deadline = time.time() + wait_s
    for pid in pids:
        while _running(pid):
            if time.time() > deadline:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a killed child whose dead parent nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def session_env(cfg: ServeConfig) -> dict[str, str]:
    """Environment of the local Ray a serve config runs on: torch threads per replica, and the HTTP front.

    ``proxy: haproxy`` turns on Ray Serve's HAProxy ingress and its throughput-optimised settings (direct
    ingress to replicas, gRPC between deployments, user code on the replica's event loop). HAProxy's own
    metrics and stats listeners get free ports, and its config, admin socket and state a folder of this server's own
    (:func:`haproxy_folder`; Ray's default is one shared ``/tmp/haproxy-serve``), so two servers on one machine collide
    in nothing and stopping one deletes only its files.
    """
    env = {"OMP_NUM_THREADS": str(max(1, int(cfg.ray_actor_options.get("num_cpus", 1))))}
    if cfg.autoscaling is not None:  # replicas push their TTFT and queue stats every second (Ray's default: every 10 s)
        env["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "1"
    if cfg.proxy == "haproxy":
        # Ray drains a direct-ingress replica for 30 s so remote load balancers notice; this HAProxy is local.
        env |= {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        }
        folder = haproxy_folder(env["RAY_SERVE_HAPROXY_STATS_PORT"])
        env |= {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state")}
    return env


def _shutdown_serve(timeout_s: float) -> None:
    """Serve's graceful shutdown (in-flight requests finish), given up after ``timeout_s``: when a signal to the
    whole process group already stopped Ray's own processes, Serve would wait for a controller that is gone."""
    from ray import serve as ray_serve

    done = threading.Thread(target=ray_serve.shutdown, name="serve-shutdown", daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"[hone] Serve did not shut down within {timeout_s:.0f}s: stopping Ray", flush=True)


def _drain(name: str, timeout_s: float) -> None:
    """Stop taking requests and wait (up to ``timeout_s``) until those in flight have answered: a SIGTERM (Kubernetes,
    systemd) lets running streams finish instead of cutting them off."""
    from ray import serve as ray_serve

    deadline = time.time() + timeout_s
    try:
        ingress = ray_serve.get_app_handle(name)
        while (left := ingress.drain.remote().result(timeout_s=10)) and time.time() < deadline:
            time.sleep(0.2)
    except Exception as e:  # noqa: BLE001 - the application may already be gone; shut down regardless
        print(f"[hone] could not drain {name}: {type(e).__name__}: {e}", flush=True)
        return
    if left:
        print(f"[hone] {left} request(s) still running after {timeout_s:.0f}s: stopping anyway", flush=True)


def cpus_needed(cfg: ServeConfig) -> float:
    """Logical CPUs the application reserves at its largest: every model replica plus the ingress."""
    replicas = (cfg.autoscaling_config or {}).get("max_replicas", cfg.num_replicas or 1)
    return float(cfg.ray_actor_options.get("num_cpus", 1)) * replicas + 0.1


def _wait_ready(name: str, timeout: float) -> None:
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        app = serve.status().applications.get(name)
        if app is not None and app.status == "RUNNING":
            return
        # UNHEALTHY is not the end: a replica that died while the application started is replaced by Serve, and the
        # service must stay up through it. DEPLOY_FAILED is: Serve gave up (replicas keep failing in their constructor).
        if app is not None and app.status == "DEPLOY_FAILED":
            raise RuntimeError(f"application {name} failed to deploy: {app.message}")
        time.sleep(0.5)
    raise RuntimeError(f"application {name} not running after {timeout:.0f}s")


def serve(
    cfg: ServeConfig, *, address: str | None = None, block: bool = True, ready_file: str | None = None, access_log: bool = True
) -> ServeSpec:
    """Deploy ``cfg`` (local embedded Ray unless ``address``/``RAY_ADDRESS``) and serve until SIGINT/SIGTERM; returns
    what was served (:class:`hone.serving.spec.ServeSpec`: the engine and why, the model, its quantisation).

    ``block=False`` returns once the application runs (inside a Ray session the caller holds);
    ``access_log=False`` keeps per-request lines and Serve's INFO chatter off the console.
    """
    import ray
    from ray import serve as ray_serve

    from hone.serving.app import build_app
    from hone.serving.spec import ServeError, api_key_hashes, check_auth, resolve

    spec = resolve(cfg)  # fail before starting Ray: missing artifact, failed gate, a public port without keys, a busy port
    print(f"[hone] engine     {spec.engine}: {spec.engine_reason}", flush=True)
    keys = api_key_hashes(cfg)
    check_auth(cfg, keys)
    if not is_remote(address) and not ray.is_initialized():  # the Ray this starts will need both ports (a pipeline's has them)
        for key, host in (("port", cfg.host), ("metrics_export_port", cfg.metrics_host)):
            holder = port_in_use(host, getattr(cfg, key))
            if holder:
                raise ServeError(f"{key} {getattr(cfg, key)} on {host} is already in use by {holder}: stop it, or pass "
                                 f"{key}=N with a free port")
    need = cpus_needed(cfg)
    with serving_session(cfg, None, address, need):
        # After ray.init: it installs a SIGTERM handler of its own that ends the process on the spot.
        stop = stop_event() if block else None  # non-blocking callers keep their own Ctrl-C handling
        logging_config = None if access_log else {"log_level": "WARNING", "enable_access_log": False}
        ray_serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
        app = build_app({"config": cfg.to_dict(), "spec": spec, "api_key_hashes": keys})
        ray_serve.run(app, name=cfg.name, route_prefix=cfg.route_prefix, blocking=False, logging_config=logging_config)
        _wait_ready(cfg.name, 600)
        base = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        what = f"{spec.source} ({spec.kind}, {spec.task}, quantisation {spec.quantization})"
        print(f"[hone] serving {spec.served_name} = {what}", flush=True)
        print(
            f"[hone] endpoint   {base}/v1  (OpenAI API: /v1/models, /v1/completions, /v1/chat/completions"
            f"{', /v1/classify' if spec.task == 'sequence_classification' else ''})",
            flush=True,
        )
        if not is_remote(address):
            print(
                f"[hone] metrics    http://127.0.0.1:{cfg.metrics_export_port}/metrics (Prometheus; hone_* series appear as ray_hone_*)",
                flush=True,
            )
        dashboard = dashboard_url()
        if dashboard:
            print(f"[hone] dashboard  http://{dashboard}", flush=True)
        if keys:
            print(f"[hone] auth       {len(keys)} API key(s): send 'Authorization: Bearer <key>'", flush=True)
        else:
            print("[hone] WARNING: no API keys configured (HONE_API_KEYS or api_keys_file): authentication is OFF", flush=True)
        if ready_file:
            Path(ready_file).write_text(
                yaml.safe_dump({"url": base, "served_name": spec.served_name, "ray_address": ray.get_runtime_context().gcs_address})
            )
        if stop is None:
            return spec
        print("[hone] serving until Ctrl-C", flush=True)
        while not stop.wait(0.5):
            pass
        print(f"[hone] shutting down: new requests get 503, running ones have {cfg.drain_timeout_s:.0f}s to finish", flush=True)
        _drain(cfg.name, cfg.drain_timeout_s)
        _shutdown_serve(20.0)
    return spec
