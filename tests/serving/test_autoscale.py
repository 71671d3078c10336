"""Autoscaling on time to first token (hone.serving.autoscale): the policy's rule on Ray Serve's context, then a real
hone serve (tiny model, one request per batch) under a load ramped from 1 to 16 concurrent requests on loopback: it
goes from 1 to 2 replicas once the replicas' p90 TTFT crosses the target, and back to 1 after the load stops."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from hone.serving.autoscale import LLMAutoscalingPolicy, TTFTWindow

from tests.helpers import ServeProbe, free_port, start_server, stop_server


def _ctx(replicas: int, ttft: list[float], queue: list[float], ongoing: float = 0.0) -> SimpleNamespace:
    ids = [f"r{i}" for i in range(replicas)]
    return SimpleNamespace(current_num_replicas=replicas, total_num_requests=ongoing,
                           aggregated_metrics={"ttft_p90_s": dict(zip(ids, ttft)), "queue_depth": dict(zip(ids, queue))})


def test_the_policy_adds_a_replica_on_slow_first_tokens_or_long_queues_and_removes_one_when_idle():
    ttft_only = LLMAutoscalingPolicy(target_ttft_p90_s=1.0)
    assert ttft_only(_ctx(1, [2.5], [0], ongoing=8))[0] == 2  # the slowest replica decides
    assert ttft_only(_ctx(2, [0.2, 1.4], [0, 0], ongoing=8))[0] == 3
    assert ttft_only(_ctx(2, [0.7, 0.6], [0, 0], ongoing=8))[0] == 2  # between half the target and the target: hold
    assert ttft_only(_ctx(2, [0.1, 0.0], [0, 0], ongoing=0))[0] == 1
    assert ttft_only(_ctx(2, [0.1, 0.0], [0, 0], ongoing=6))[0] == 2  # fast, but busy: hold
    queue = LLMAutoscalingPolicy(target_queue_depth=4)
    assert queue(_ctx(2, [0, 0], [6, 4], ongoing=20))[0] == 3  # mean queue 5 > 4
    assert queue(_ctx(2, [0, 0], [3, 4], ongoing=20))[0] == 2
    assert queue(_ctx(0, [], [], ongoing=1))[0] == 1  # from zero on the first request


def test_the_ttft_window_keeps_the_recent_p90():
    w = TTFTWindow(window_s=10)
    for i in range(10):
        w.add(0.1 * (i + 1), now=100.0)
    assert w.p90(now=100.0) == pytest.approx(0.9)
    assert w.p90(now=111.0) == 0.0  # all older than the window


@pytest.mark.slow
def test_a_ramped_load_scales_out_on_ttft_and_back_in_when_it_stops(tmp_path):
    target = 0.25
    cfg = {"name": "scale", "model": "builtin:tiny-llama", "served_model_name": "tiny", "port": free_port(),
           "metrics_export_port": free_port(), "max_batch_size": 1, "max_tokens_default": 48, "max_ongoing_requests": 32,
           "max_queued_requests": 64, "ray_actor_options": {"num_cpus": 0.5},
           "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 1, "downscale_delay_s": 3,
                                  "look_back_period_s": 2},
           "autoscaling": {"target_ttft_p90_s": target, "window_s": 3}}
    proc, info = start_server(cfg, tmp_path)
    probe = ServeProbe(info["ray_address"], "scale")
    stop = threading.Event()
    ttfts: list[tuple[int, float]] = []

    errors: list[BaseException] = []

    def client(level: int) -> None:  # one concurrent stream of requests until the load stops
        try:
            with httpx.Client(timeout=120) as http:
                while not stop.is_set():
                    started = time.monotonic()
                    with http.stream("POST", info["url"] + "/v1/completions", json={"model": "tiny", "prompt": "The movie was",
                                                                                     "max_tokens": 48, "stream": True}) as r:
                        assert r.status_code == 200, r.status_code
                        lines = r.iter_lines()
                        for line in lines:
                            if line.startswith("data: "):
                                ttfts.append((level, time.monotonic() - started))
                                break
                        for _ in lines:  # the rest of the stream
                            pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads: list[threading.Thread] = []
    try:
        assert probe.running() == 1
        deadline = time.monotonic() + 180
        while probe.running() < 2 and not errors:  # ramp: one more concurrent client a second, up to 16, held until Serve scales out
            assert time.monotonic() < deadline, "no scale-out within 180 s"
            if len(threads) < 16:
                threads.append(threading.Thread(target=client, args=(len(threads) + 1,), daemon=True))
                threads[-1].start()
            time.sleep(1)
        stop.set()
        for t in threads:
            t.join(timeout=120)
        probe.wait_running(1, timeout=120)  # idle again: back to min_replicas
    finally:
        stop.set()
        probe.close()
        stop_server(proc)
    assert not errors, errors
    assert ttfts and max(t for _, t in ttfts) > target  # what the clients saw: first tokens slower than the target
