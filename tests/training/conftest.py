"""Fixtures shared by the training tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def connected(cluster, tmp_path_factory):
    """This test process as a driver on the cluster, with the (CPU) training workers' environment; a runs folder."""
    import ray
    from tests.conftest import make_job

    from hone.runtime import worker_env

    if not ray.is_initialized():
        ray.init(address=cluster["address"], runtime_env={"env_vars": worker_env(make_job())},
                 logging_config=ray.LoggingConfig(encoding="TEXT", log_level="WARNING"))
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def slow_reports(cluster):
    """Make each report wait for the controller (1 s poll) so a kill lands between steps."""
    return {**cluster["env"], "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "HONE_HOME": os.environ["HONE_HOME"]}
