"""The Ray runtime's pieces that need no cluster (hone.runtime): worker environments, quiet libraries, stop
signals, ports. ray_session itself runs in every end-to-end test (train, tune, serve, pipeline, cluster)."""

from __future__ import annotations

import logging
import os
import signal
import socket

from hone import runtime

from tests.helpers import make_job


def test_worker_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HONE_HOME", str(tmp_path))
    # settings travel in the runtime_env; secrets never do (anyone with the dashboard or the Jobs API reads it)
    monkeypatch.setenv("HF_TOKEN", "secret-for-the-hub")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-for-the-store")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://store:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:hunter2@mlflow.example.com")
    env = runtime.worker_env(make_job(distributed={"num_workers": 2, "resources_per_worker": {"CPU": 3}}))
    assert env["HONE_HOME"] == str(tmp_path) and env["AWS_ENDPOINT_URL"] == "http://store:9000"
    assert not {"HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"} & set(env), env
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert runtime.worker_env(make_job())["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["OMP_NUM_THREADS"] == "3" and env["DS_ACCELERATOR"] == "cpu" and env["TOKENIZERS_PARALLELISM"] == "false"
    assert "DS_ACCELERATOR" not in runtime.base_worker_env()


def test_remote_means_an_address_or_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not runtime.is_remote(None) and runtime.is_remote("10.0.0.5:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert runtime.is_remote(None)


def test_quiet_libraries_raises_the_noisy_loggers():
    logging.getLogger("torchao").setLevel(logging.NOTSET)
    runtime.quiet_libraries()
    assert logging.getLogger("torchao").level == logging.ERROR and logging.getLogger("mlflow").level == logging.WARNING


def test_stop_event_is_set_by_sigterm():
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = runtime.stop_event()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def test_free_port_is_bindable():
    port = runtime.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
