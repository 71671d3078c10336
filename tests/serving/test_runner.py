"""``hone serve``'s outputs that need no running server: the plain Ray Serve config it emits, and the Grafana
dashboard and Prometheus alerts over the series the deployments define (the server itself: test_app.py)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import hone


def test_emit_serve_config_matches_the_app_builder(repo):
    import yaml

    out = hone("serve", str(repo / "serving" / "tiny.yaml"), "--emit-serve-config", timeout=120)
    assert out.returncode == 0, out.stderr
    doc = yaml.safe_load(out.stdout)
    app = doc["applications"][0]
    assert app["import_path"] == "hone.serving.app:build_app"
    from hone.config import load_serve_config

    assert app["args"]["config"] == load_serve_config(repo / "serving" / "tiny.yaml").to_dict()


def test_dashboard_and_alerts_use_metrics_the_server_exports(repo):
    """Every hone series the Grafana dashboard and the alert rules query is one the app defines."""
    import re

    import yaml

    source = "".join(p.read_text() for p in (repo / "platform" / "hone" / "serving").glob("*.py"))
    defined = set(re.findall(r'metrics\.(?:Counter|Gauge|Histogram)\(\s*"(hone_[a-z0-9_]+)"', source))
    assert {"hone_requests_total", "hone_time_to_first_token_seconds", "hone_e2e_request_latency_seconds"} <= defined
    dashboard = json.loads((repo / "serving" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((repo / "serving" / "prometheus-alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {"HoneHighErrorRate", "HoneP99LatencyHigh",
                                                                       "HoneReplicaRestarts", "HoneQueueSaturated"}
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"ray_(hone_[a-z0-9_]+)", e)}
    assert used and used <= defined, used - defined


def test_require_auth_refuses_a_public_port_without_keys_before_ray(repo, tmp_path):
    import os
    import time

    import pytest

    from hone.config import validate_serve_config
    from hone.serving.spec import ServeError, check_auth

    public = validate_serve_config({"model": "builtin:tiny-llama", "host": "0.0.0.0"})  # fail closed: keys by default
    for cfg_ in (public, validate_serve_config({"model": "builtin:tiny-llama", "host": "0.0.0.0", "require_auth": True})):
        with pytest.raises(ServeError, match="no API keys are configured: set HONE_API_KEYS .* or set require_auth: false"):
            check_auth(cfg_, [])
        check_auth(cfg_, ["0" * 64])  # with a key
    local = validate_serve_config({"model": "builtin:tiny-llama", "host": "127.0.0.1"})
    check_auth(local, [])
    with pytest.raises(ServeError, match="no API keys"):  # serve deploy / KubeRay: the proxy listens on every interface
        check_auth(local, [], host="0.0.0.0")
    check_auth(validate_serve_config({"model": "builtin:tiny-llama", "host": "127.0.0.1", "require_auth": True}), [])
    check_auth(validate_serve_config({"model": "builtin:tiny-llama", "host": "0.0.0.0", "require_auth": False}), [])  # on purpose
    cfg = tmp_path / "public.yaml"
    cfg.write_text("model: builtin:tiny-llama\nhost: 0.0.0.0\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HONE_API_KEYS", "RAY_ADDRESS")}
    started = time.time()
    out = hone("serve", str(cfg), env=env, timeout=120)
    assert out.returncode != 0 and "no API keys are configured" in out.stderr + out.stdout, out.stderr[-2000:]
    assert "Started a local Ray instance" not in out.stderr + out.stdout and time.time() - started < 60


def test_each_haproxy_server_keeps_its_files_in_a_folder_of_its_own():
    """Config, admin socket and state of one server's HAProxy live in its own folder (Ray's default is one shared
    /tmp/haproxy-serve), and stopping it deletes that folder only (the reaper used to delete whatever folder held a
    config mentioning its port)."""
    import shutil

    from hone.config import validate_serve_config
    from hone.serving.runner import haproxy_folder, reap_haproxy, session_env

    cfg = validate_serve_config({"model": "builtin:tiny-llama", "proxy": "haproxy"})
    a, b = session_env(cfg), session_env(cfg)
    folders = [haproxy_folder(env["RAY_SERVE_HAPROXY_STATS_PORT"]) for env in (a, b)]
    assert folders[0] != folders[1]
    for env, folder in zip((a, b), folders):
        for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
            assert Path(env[key]).parent == folder and len(env[key].encode()) <= 107, (key, env[key])
        folder.mkdir()
        (folder / "haproxy.cfg").write_text(f"bind *:{env['RAY_SERVE_HAPROXY_STATS_PORT']}\n")
    try:
        reap_haproxy(a, wait_s=0)
        assert not folders[0].exists() and (folders[1] / "haproxy.cfg").exists()
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)


def test_a_busy_port_is_named_with_its_holder_before_ray_starts(tmp_path):
    """The serve port and the metrics port are checked before any Ray work, and the message names who holds them (a
    killed server's leftovers used to surface as Ray's start-up timeout, or as a refusal after minutes)."""
    import os
    import socket

    from hone.runtime import free_port

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        for key in ("port", "metrics_export_port"):
            cfg = tmp_path / f"{key}.yaml"
            other = "metrics_export_port" if key == "port" else "port"
            cfg.write_text(f"model: builtin:tiny-llama\n{key}: {busy}\n{other}: {free_port()}\n")
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            out = hone("serve", str(cfg), env=env, timeout=120)
            text = out.stderr + out.stdout
            assert out.returncode != 0 and f"{key} {busy} on 127.0.0.1 is already in use by pid {os.getpid()}" in text, text[-2000:]
            assert "Started a local Ray instance" not in text
