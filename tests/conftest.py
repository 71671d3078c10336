"""Shared test setup: offline, a repo-local hone cache, one tokenised-data cache for the session, the test cluster, and the
order tests run in: in one process (`make test`), everything that starts its own Ray first, then everything on the shared
cluster, so no test runs beside an idle cluster; in two lanes (pytest-xdist), one worker runs every test on the shared
cluster, the other every module that starts a Ray, a server or a CLI of its own. The helpers tests call live in
tests/helpers.py."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
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
# One tokenised-data cache for every run of the session (hone keys entries by content and settings): each data set is
# tokenised on Ray Data once per session, not once per test. The object-storage test keeps its cache in the bucket.
_DATA_CACHE = None
if "HONE_DATA_CACHE" not in os.environ:
    _DATA_CACHE = tempfile.mkdtemp(prefix="hone-test-data-")
    os.environ["HONE_DATA_CACHE"] = _DATA_CACHE


def pytest_unconfigure(config):
    if _DATA_CACHE:
        shutil.rmtree(_DATA_CACHE, ignore_errors=True)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        Path(_LANES).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from hone import assets

    return AutoTokenizer.from_pretrained(assets.resolve_model("builtin:tiny-llama"))


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A private registry for one test (:func:`tests.helpers.private_home`)."""
    from tests.helpers import private_home

    return private_home(tmp_path, monkeypatch)


# --------------------------------------------------------------------------- the test cluster


@pytest.fixture(scope="session")
def cluster():
    """A real three-node Ray cluster on this machine (cluster/local.sh): head + 2 worker nodes, 2 CPUs each, Jobs API on.

    Its state lives in a short /tmp path: Ray's dashboard modules use AF_UNIX sockets under it (≤ 107 bytes). A node
    that dies is declared dead after about 3 s (Ray's default is about 15 s), so the elastic test sees it go promptly.
    """
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "HONE_CLUSTER_PORT": "6391", "HONE_CLUSTER_METRICS_PORT": "8181", "HONE_CLUSTER_DASHBOARD": "1",
           "HONE_CLUSTER_DASHBOARD_PORT": "8275",
           "HONE_CLUSTER_DIR": tempfile.mkdtemp(prefix="hone-c", dir="/tmp"), "RAY_AUTH_MODE": "disabled",
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3",
           # the nodes' own object-store keys (moto's server takes any): drivers never send theirs (hone.runtime)
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    script = str(REPO / "cluster" / "local.sh")
    up = subprocess.run([script, "up", "2"], env=env, capture_output=True, text=True)
    assert up.returncode == 0, up.stdout + up.stderr
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield {"address": "127.0.0.1:6391", "jobs_api": "http://127.0.0.1:8275", "env": env, "script": script}
    finally:
        import ray

        # also when this process is no driver: a state API call (``list_actors(address=...)``) leaves Ray's internal-KV
        # client pointing at the cluster, and Tune's exit hook (after an in-process sweep) would retry it for 60 s once
        # the cluster is down, then end the process with exit code 1
        ray.shutdown()
        subprocess.run([script, "down"], env=env, capture_output=True)
        shutil.rmtree(env["HONE_CLUSTER_DIR"], ignore_errors=True)


@pytest.fixture(scope="module")
def connected(cluster, tmp_path_factory):
    """This test process as a driver on the test cluster, with the (CPU) training workers' environment; a runs folder for
    the module. The driver leaves the cluster with the module: whatever its runs left (a finished run's Train controller,
    a Tune trial's placement group) ends with its job, so the next module starts on an idle cluster."""
    import ray

    from hone.runtime import worker_env

    from tests.helpers import make_job

    if not ray.is_initialized():
        ray.init(address=cluster["address"], runtime_env={"env_vars": worker_env(make_job())},
                 logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
    yield tmp_path_factory.mktemp("runs")
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_env(cluster):
    """The environment of ``hone`` commands run against the test cluster."""
    return {**cluster["env"], "HONE_HOME": os.environ["HONE_HOME"], "HONE_DATA_CACHE": os.environ["HONE_DATA_CACHE"]}


@pytest.fixture(scope="session")
def slow_reports(cluster_env):
    """Each report waits for the controller's 1 s poll, so a kill after a logged step lands long before the next checkpoint."""
    return {**cluster_env, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}


# --------------------------------------------------------------------------- order and time


# Two lanes (`make test TEST_LANES="-n 2 --dist loadscope --no-loadscope-reorder"`, pytest-xdist). Every test on the shared cluster
# is one unit of work, so one worker runs them all, in their order, against the one cluster; every other module (each
# starts a Ray, a server or a CLI of its own) is a unit of its own for the other worker. The training tests keep the
# cores busy while the serving tests wait on their servers. The workers record each test's lane in this file (only they
# see the tests' fixtures); the controller's scheduler reads it.
_LANES = os.environ.setdefault("HONE_TEST_LANES", os.path.join(tempfile.gettempdir(), f"hone-test-lanes-{os.getpid()}.json"))


def pytest_collection_modifyitems(config, items):
    """tests/gpu holds CUDA-only checks: skipped (not faked) on machines without a GPU. The tests on the shared cluster run
    first in two lanes (one worker takes them all at once), last in one process (after every test that starts a Ray of its
    own, so no test runs beside an idle cluster)."""
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if f"{os.sep}gpu{os.sep}" in str(item.fspath):
                item.add_marker(skip)
    lanes = {item.nodeid: "cluster" if "cluster" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
             for item in items}
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    items.sort(key=lambda item: (lanes[item.nodeid] == "cluster") != bool(worker))
    if worker:
        partial = f"{_LANES}.{worker}"
        Path(partial).write_text(json.dumps(lanes))
        os.replace(partial, _LANES)  # every worker collects the same tests: whichever lands last, the content is the same


def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` by lane: a test's scope is its lane (above), not its module."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByLane(LoadScopeScheduling):
        lanes: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:  # the scope hook LoadScopeScheduling documents
            if self.lanes is None:  # first asked once every worker has collected
                self.lanes = json.loads(Path(_LANES).read_text())
            return self.lanes[nodeid]

    return ByLane(config, log)


_SPENT: dict[str, float] = {}
_STARTED = time.time()


def pytest_runtest_logreport(report):
    _SPENT[report.nodeid.split("::")[0]] = _SPENT.get(report.nodeid.split("::")[0], 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _SPENT:
        return
    terminalreporter.section("time per test module (setup + call + teardown)")
    for module, seconds in sorted(_SPENT.items(), key=lambda kv: -kv[1]):
        if seconds >= 1.0:
            terminalreporter.write_line(f"{seconds:8.1f} s  {module}")
    terminalreporter.write_line(f"{sum(_SPENT.values()):8.1f} s  in tests; {time.time() - _STARTED:.1f} s since the session began")
