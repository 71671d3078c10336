"""``hone serve``'s outputs that need no running server: the plain Ray Serve config it emits, and the Grafana
dashboard and Prometheus alerts over the series the deployments define (the server itself: test_app.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HONE = str(Path(sys.executable).parent / "hone")


def test_emit_serve_config_matches_the_app_builder(repo):
    import yaml

    out = subprocess.run([HONE, "serve", str(repo / "serving" / "tiny.yaml"), "--emit-serve-config"], capture_output=True, text=True)
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
