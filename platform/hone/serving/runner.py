"""``hone serve``: deploy a serve YAML on Ray Serve and keep serving until stopped."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from hone.serving.config import ServeConfig

__all__ = ["serve", "serve_config_document"]


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


def _stop_event() -> threading.Event:
    """An event that SIGINT/SIGTERM set, so a serving loop ends with a clean Serve and Ray shutdown."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _cpus_needed(cfg: ServeConfig) -> float:
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
        if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {name} failed to deploy: {app.message}")
        time.sleep(0.5)
    raise RuntimeError(f"application {name} not running after {timeout:.0f}s")


def _dashboard_url(ray: Any) -> str | None:
    try:
        return ray._private.worker.global_worker.node.webui_url or None  # noqa: SLF001 - no public accessor
    except Exception:  # noqa: BLE001
        return None


def serve(cfg: ServeConfig, *, address: str | None = None, block: bool = True, ready_file: str | None = None,
          access_log: bool = True) -> None:
    """Deploy ``cfg`` (local embedded Ray unless ``address``/``RAY_ADDRESS``) and serve until SIGINT/SIGTERM.

    ``block=False`` returns once the application runs (inside a Ray session the caller holds);
    ``access_log=False`` keeps per-request lines and Serve's INFO chatter off the console.
    """
    from ray import serve as ray_serve

    from hone.serving.app import api_key_hashes, build_app, resolve
    from hone.train import ray_session

    spec = resolve(cfg)  # fail before starting Ray: missing artifact, failed gate
    keys = api_key_hashes(cfg)
    need = _cpus_needed(cfg)
    stop = _stop_event() if block else None  # non-blocking callers keep their own Ctrl-C handling
    with ray_session(None, address, extra_cpus=need, env={"OMP_NUM_THREADS": str(max(1, int(cfg.ray_actor_options.get("num_cpus", 1))))},
                     metrics_export_port=cfg.metrics_export_port):
        import ray

        logging_config = None if access_log else {"log_level": "WARNING", "enable_access_log": False}
        ray_serve.start(http_options={"host": cfg.host, "port": cfg.port}, logging_config=logging_config)
        app = build_app({"config": cfg.to_dict()})
        ray_serve.run(app, name=cfg.name, route_prefix=cfg.route_prefix, blocking=False, logging_config=logging_config)
        _wait_ready(cfg.name, 600)
        base = f"http://{'127.0.0.1' if cfg.host in ('0.0.0.0', '::') else cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        what = f"{spec['source']} ({spec['kind']}, {spec['task']}, quantisation {spec['quantization']})"
        print(f"[hone] serving {spec['served_name']} = {what}", flush=True)
        print(f"[hone] endpoint   {base}/v1  (OpenAI API: /v1/models, /v1/completions, /v1/chat/completions"
              f"{', /v1/classify' if spec['task'] == 'sequence_classification' else ''})", flush=True)
        if not address and not os.environ.get("RAY_ADDRESS"):
            print(f"[hone] metrics    http://127.0.0.1:{cfg.metrics_export_port}/metrics (Prometheus; hone_* series appear as ray_hone_*)",
                  flush=True)
        dashboard = _dashboard_url(ray)
        if dashboard:
            print(f"[hone] dashboard  http://{dashboard}", flush=True)
        if keys:
            print(f"[hone] auth       {len(keys)} API key(s): send 'Authorization: Bearer <key>'", flush=True)
        else:
            print("[hone] WARNING: no API keys configured (HONE_API_KEYS or api_keys_file): authentication is OFF", flush=True)
        if ready_file:
            Path(ready_file).write_text(yaml.safe_dump({"url": base, "served_name": spec["served_name"],
                                                        "ray_address": ray.get_runtime_context().gcs_address}))
        if stop is None:
            return
        print("[hone] serving until Ctrl-C", flush=True)
        while not stop.wait(0.5):
            pass
        print("[hone] shutting down", flush=True)
        ray_serve.shutdown()
