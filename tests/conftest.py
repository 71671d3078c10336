"""Shared test setup: offline, a repo-local hone cache, small thread counts for 2-core machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Set before hone/transformers are imported by any test module.
os.environ.setdefault("HONE_HOME", str(REPO / ".hone-test"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from hone import assets

    return AutoTokenizer.from_pretrained(assets.resolve_model("builtin:tiny-llama"))


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


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private registry (HONE_HOME/mlflow) while keeping the shared built-in model cache."""
    registry_home = tmp_path / "home"
    (registry_home / "models").mkdir(parents=True)
    shared = Path(os.environ["HONE_HOME"]) / "models"
    shared.mkdir(parents=True, exist_ok=True)
    for built in shared.iterdir():
        (registry_home / "models" / built.name).symlink_to(built)
    monkeypatch.setenv("HONE_HOME", str(registry_home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return registry_home


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real three-node Ray cluster on this machine (cluster/local.sh): head + 2 worker nodes, 2 CPUs each, Jobs API on.

    Its state lives in a short /tmp path: Ray's dashboard modules use AF_UNIX sockets under it (≤ 107 bytes).
    """
    import shutil
    import subprocess
    import sys
    import tempfile

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "HONE_CLUSTER_PORT": "6391", "HONE_CLUSTER_METRICS_PORT": "8181", "HONE_CLUSTER_DASHBOARD": "1",
           "HONE_CLUSTER_DASHBOARD_PORT": "8275",
           "HONE_CLUSTER_DIR": tempfile.mkdtemp(prefix="hone-c", dir="/tmp"), "RAY_AUTH_MODE": "disabled"}
    script = str(REPO / "cluster" / "local.sh")
    subprocess.run([script, "down"], env=env, capture_output=True)
    up = subprocess.run([script, "up", "2"], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield {"address": "127.0.0.1:6391", "jobs_api": "http://127.0.0.1:8275", "env": env}
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([script, "down"], env=env, capture_output=True)
        shutil.rmtree(env["HONE_CLUSTER_DIR"], ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """tests/gpu holds CUDA-only checks: skipped (not faked) on machines without a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if f"{os.sep}gpu{os.sep}" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def connected(cluster, tmp_path_factory):
    """This test process as a driver on the test cluster, with the (CPU) training workers' environment; a runs folder."""
    import ray

    from hone.runtime import worker_env

    if not ray.is_initialized():
        ray.init(address=cluster["address"], runtime_env={"env_vars": worker_env(make_job())},
                 logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def slow_reports(cluster):
    """Make each report wait for the controller (1 s poll) so a kill lands between steps."""
    return {**cluster["env"], "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "HONE_HOME": os.environ["HONE_HOME"]}
