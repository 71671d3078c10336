"""Cluster scale, on cluster/local.sh: a run kept in object storage (a real S3 server, moto, on 127.0.0.1) and an elastic
run that loses a worker node mid-run and gets it back."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hone.artifacts import parse_metrics
from hone.config import validate_job

from tests.helpers import (
    REPO,
    cluster_state,
    free_port,
    hone,
    kill_run,
    losses,
    records,
    run_dirs,
    start_hone,
    start_server,
    step_losses,
    stop_group,
    stop_server,
    train_worker_pids,
    wait_cluster_idle,
    wait_until,
)

BUCKET = "hone-test"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket holding the training data; the AWS variables that reach it."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        def up() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(up, "the S3 server", 60, proc=proc)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        rows = [{"instruction": "Label the review", "input": f"review {i}: " + ("good " if i % 2 else "bad ") * (1 + i % 5),
                 "output": "positive" if i % 2 else "negative"} for i in range(400)]
        client.put_object(Bucket=BUCKET, Key="data/reviews.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        yield {"env": env, "client": client}
    finally:
        stop_group(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _job(name: str, **over) -> dict:
    raw = {
        "name": name,
        "model": {"name": "builtin:tiny-llama"},
        "method": {"type": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca", "max_length": 160, "max_samples": 400, "max_eval_samples": 16},
        "distributed": {"num_workers": 2, "deepspeed": {"stage": 2}},
        "training": {"lr": 1e-3, "batch_size": 2, "max_steps": 10, "log_every": 1, "eval_every": 100, "checkpoint_every": 2,
                     "keep_checkpoints": 3},
    }
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return raw


def _own_home(tmp: Path) -> Path:
    """A hone home of its own (nothing local is shared with the test's), with the shared built-in model cache."""
    home = tmp / "home"
    home.mkdir()
    (home / "models").symlink_to(Path(os.environ["HONE_HOME"]) / "models")
    return home


@pytest.mark.slow
def test_a_run_in_object_storage_resumes_exports_registers_and_serves(cluster, s3, tmp_path, monkeypatch):
    """Data, the tokenised cache, checkpoints, metrics, the export and the quantised artifact live in S3; the local mirror
    is deleted between every stage (interruption → resume → register → quantise → serve), so each reads the store."""
    client = s3["client"]
    job = tmp_path / "s3.yaml"
    job.write_text(yaml.safe_dump(_job("s3run", data={"source": f"s3://{BUCKET}/data/reviews.jsonl", "validation": 0.1},
                                       training={"max_steps": 8, "checkpoint_every": 4})))
    home = _own_home(tmp_path)
    # the session's shared data cache is local: this run keeps its own in the bucket, beside its runs
    # the driver's own secrets (moto takes any keys): none of them may reach the cluster's view of the job
    secrets = {"AWS_SECRET_ACCESS_KEY": "driver-only-s3-secret", "HF_TOKEN": "hf_driver_only_token"}
    env = {**{k: v for k, v in cluster["env"].items() if k != "HONE_DATA_CACHE"}, "HONE_HOME": str(home),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", **s3["env"], **secrets}
    runs = f"s3://{BUCKET}/runs"
    log = tmp_path / "first.log"
    proc = start_hone("train", str(job), "--address", cluster["address"], "--storage-path", runs, env=env, log=log)
    mirror = home / "remote" / "s3" / BUCKET / "runs"
    workers: list[int] = []
    try:
        run = wait_until(lambda: next((p.name for p in run_dirs(mirror) if p.name.startswith("s3run")), None), "the run's folder",
                         300, proc, log)
        key = f"runs/{run}/metrics.jsonl"

        def logged(step: int) -> bool:
            try:
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            except client.exceptions.NoSuchKey:
                return False
            return max(step_losses(parse_metrics(body)), default=0) >= step

        wait_until(lambda: logged(1), "step 1 in the store's metrics.jsonl", 600, proc, log, every=0.2)
        workers = wait_until(lambda: train_worker_pids(cluster["address"]), "the run's Ray Train workers", proc=proc, log=log)
        # what anyone with the dashboard or the Jobs API reads about the running job: no secret of its driver
        from ray.util.state import list_jobs

        seen = json.dumps([j.__dict__ for j in list_jobs(address=cluster["address"], detail=True)], default=str)
        assert "s3run" in seen or "hone" in seen, seen[:2000]
        assert not [v for v in secrets.values() if v in seen], "a driver's secret is readable in the cluster's job list"
        wait_until(lambda: logged(5), "step 5 in the store's metrics.jsonl", 600, proc, log, every=0.2)
    finally:
        kill_run(proc, workers)
    first = log.read_text()
    assert "tokenised on Ray Data" in first, first[-3000:]
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]]
    assert any(k.startswith(f"runs/{run}/checkpoint_") for k in objects), objects
    assert any(k.startswith("runs/.hone-data/") and k.endswith("manifest.json") for k in objects), objects
    assert not any(k.startswith(f"runs/{run}/export/") for k in objects)
    shutil.rmtree(home / "remote")  # nothing of the run is left on this machine

    out = hone("train", "--resume", f"{runs}/{run}", "--address", cluster["address"], env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed at step 4/8" in out.stdout and "data (cached" in out.stdout, out.stdout[-3000:]
    history = step_losses(parse_metrics(client.get_object(Bucket=BUCKET, Key=f"runs/{run}/metrics.jsonl")["Body"].read().decode()))
    assert sorted(history) == list(range(1, 9))
    assert abs(history[5][0] - history[5][-1]) < 1e-5, history[5]  # step 5 before the kill and after the resume
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run}/export/")["Contents"]]
    assert f"runs/{run}/export/hone.json" in objects and f"runs/{run}/export/adapter_model.safetensors" in objects

    # registered (the version's source is the export in the store) and served from there by a fresh hone home
    from hone import registry
    from hone.artifacts import EXPORT_DIR, resolve_run_dir

    monkeypatch.setenv("HONE_HOME", str(home))  # this process reads and registers in the runs' hone home
    remote = resolve_run_dir(f"{runs}/{run}")
    meta = json.loads((remote / "hone-run.json").read_text())
    registry.register_winner("s3-tiny", meta["mlflow_run_id"], remote / EXPORT_DIR, "eval_loss", meta["metrics"]["eval_loss"])
    assert registry.resolve_model_ref("models:/s3-tiny@winner")["source"] == f"{runs}/{run}/export"
    shutil.rmtree(home / "remote")
    quantized = f"s3://{BUCKET}/quantized/s3-tiny"
    args = ("quantize", "models:/s3-tiny@winner", "--method", "int8-dynamic", "--out", quantized, "-n", "8", "--max-loss-increase",
            "0.5", "--max-accuracy-drop", "none")
    refused = hone(*args, env=env, timeout=300)  # a bucket the operator has not listed: nothing is fetched from it
    assert refused.returncode != 0 and "HONE_MODEL_ROOTS" in refused.stderr, refused.stderr[-3000:]
    assert not (home / "remote").exists()
    env["HONE_MODEL_ROOTS"] = runs
    q = hone(*args, env=env)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    assert registry.resolve_model_ref("models:/s3-tiny@winner")["tags"]["hone.quantized.int8-dynamic"] == quantized
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="quantized/s3-tiny/")["Contents"]]
    assert "quantized/s3-tiny/quantization.json" in keys, keys
    shutil.rmtree(home / "remote")

    # Served on the cluster, shared-nothing: two replicas, one on each worker node, with a hone home of their own (what
    # the nodes' disks hold: not the deploying process's); that process resolves the reference and hashes what it found,
    # each replica fetches the artifact from the store itself and serves it only if it hashes the same.
    (tmp_path / "nodes").mkdir()
    node_home = _own_home(tmp_path / "nodes")
    cfg = {"name": "s3", "model": quantized, "served_model_name": "s3-tiny", "port": free_port(), "max_tokens_default": 8,
           "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25, "resources": {"hone_node": 1},
                                                    "runtime_env": {"env_vars": {"HONE_HOME": str(node_home)}}}}
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    proc, info = start_server(cfg, serve_dir, env, args=("--address", cluster["address"]))
    try:
        import httpx

        replicas: set[str] = set()

        def both_answered() -> bool:
            r = httpx.post(info["url"] + "/v1/completions", json={"model": "s3-tiny", "prompt": "The movie was", "max_tokens": 4},
                           timeout=120)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
            replicas.add(r.headers["X-Hone-Replica"])
            return len(replicas) == 2

        wait_until(both_answered, "answers from the replicas on both worker nodes", timeout=120, proc=proc, every=0)
    finally:
        stop_server(proc)
    wait_cluster_idle(cluster["address"])  # the replicas gave back the worker nodes' CPUs for the tests after this one
    assert (node_home / "remote" / "s3" / BUCKET / "quantized" / "s3-tiny" / "quantization.json").exists()  # the replicas' fetch
    from hone.artifacts import ArtifactError, localize, resolve_ref

    with pytest.raises(ArtifactError, match="changed after"):  # other weights than the deployment resolved are refused
        localize(resolve_ref(quantized), "0" * 64)


def test_object_store_paths_are_checked_before_any_ray_work(s3, tmp_path):
    from hone.config import JobConfigError

    with pytest.raises(JobConfigError, match="bucket 'no-such-bucket' does not exist"):
        validate_job(_job("bad", training={"storage_path": "s3://no-such-bucket/runs"}))
    with pytest.raises(JobConfigError, match="no object matches"):
        validate_job(_job("bad", data={"source": f"s3://{BUCKET}/data/missing.jsonl"}))
    with pytest.raises(JobConfigError, match="unknown storage scheme 'ftp'"):
        validate_job(_job("bad", data={"source": "ftp://host/x.jsonl"}))
    out = hone("train", str(REPO / "jobs" / "tiny-smoke.yaml"), "--storage-path", "s3://no-such-bucket/runs", timeout=120)
    assert out.returncode != 0 and "no-such-bucket" in out.stderr + out.stdout and "Traceback" not in out.stderr


@pytest.mark.slow
def test_elastic_run_loses_a_node_continues_and_grows_back(cluster, cluster_env, tmp_path):
    """num_workers [1, 2], one worker per worker node, a constant learning rate (a step's loss does not depend on the run's
    length). Node 2 is killed after step 5; the run goes on with one worker accumulating both micro-batches; node 2 rejoins
    and the run grows back to two workers; three steps after that the run is stopped. Every step's loss (the last
    computed, after every resize) matches an uninterrupted run of exactly that length. Each phase waits for its event in the
    run's records, however long Ray takes to notice the node and to grow back."""
    script = cluster["script"]
    # the data of test_train's runs and of jobs/tiny-smoke.yaml (tokenised once for the session)
    data = {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128, "max_samples": 256,
            "max_eval_samples": 32}
    raw = _job("elastic", data=data, distributed={"num_workers": [1, 2], "deepspeed": None, "max_failures": 5,
                                                  "resources_per_worker": {"CPU": 1, "hone_node": 1}},
               training={"max_steps": 1000, "checkpoint_every": 2, "scheduler": "constant", "eval_every": None})
    validate_job(raw)
    job = tmp_path / "elastic.yaml"
    job.write_text(yaml.safe_dump(raw))
    # Ray Train's elastic policy sees nodes come and go through Ray's autoscaling coordinator, which looks every 20 s:
    # until it has seen the dead node, each try to start two workers waits this long for them before trying again.
    # Each report waits for the controller's 1 s poll, so the phases take few steps and the reference run is short.
    env = {**cluster_env, "HONE_ELASTIC_RESIZE_S": "3", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0"}
    storage, log = tmp_path / "elastic", tmp_path / "elastic.log"
    wait_cluster_idle(cluster["address"])  # both worker nodes free: the run starts on two workers, and regrows onto node 2
    proc = start_hone("train", str(job), "--address", cluster["address"], "--storage-path", str(storage), env=env, log=log)
    node_env = cluster["env"]
    node_down = False

    def first(condition, after: int = 0) -> int | None:
        """The index of the first record after ``after`` that meets ``condition``."""
        got = records(run_dir)
        return next((i for i in range(after, len(got)) if condition(got[i])), None)

    try:
        run_dir = wait_until(lambda: next(iter(run_dirs(storage)), None), "the run folder", 300, proc, log)
        wait_until(lambda: first(lambda r: r["step"] >= 5) is not None, "step 5", 600, proc, log)
        stopped = subprocess.run([script, "stop-node", "2"], env=node_env, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        node_down = True
        shrunk = wait_until(lambda: first(lambda r: r["workers"] == 1), "steps on one worker", 600, proc, log)
        started = subprocess.run([script, "start-node", "2"], env=node_env, capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr
        node_down = False
        grown = wait_until(lambda: first(lambda r: r["workers"] == 2, shrunk), "steps on two workers again", 600, proc, log)
        regrown_at = records(run_dir)[grown]["step"]
        wait_until(lambda: first(lambda r: r["step"] >= regrown_at + 3, grown), "three steps after growing back", 600, proc, log)
    except pytest.fail.Exception as e:
        pytest.fail(f"{e}\n\nthe cluster then:\n{cluster_state(cluster['address'])}")
    finally:
        stop_group(proc)
        if node_down:  # leave the cluster whole
            subprocess.run([script, "start-node", "2"], env=node_env, capture_output=True)
    text = log.read_text()
    assert "on 1 worker(s) (was 2), 2 micro-batch(es) each" in text, text[-4000:]
    assert "on 2 worker(s) (was 1), 1 micro-batch(es) each" in text, text[-4000:]
    sizes = [r["workers"] for r in records(run_dir)]
    first_one = sizes.index(1)
    assert 2 in sizes[:first_one] and 2 in sizes[first_one:], sizes  # shrank, then grew back once node 2 rejoined
    got = {step: values[-1] for step, values in losses(run_dir).items()}
    last = max(got)
    assert sorted(got) == list(range(1, last + 1))

    # the reference: two workers throughout (a fixed size, so Ray Train does not consult the autoscaling coordinator, which
    # still holds the stopped run's request for a while)
    reference = tmp_path / "reference"
    out = hone("train", str(job), f"training.max_steps={last}", "distributed.num_workers=2", "--address", cluster["address"],
               "--storage-path", str(reference), env=cluster_env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = {step: values[-1] for step, values in losses(run_dirs(reference)[0]).items()}
    assert sorted(expected) == sorted(got)
    for step in sorted(got):
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got[step], expected[step])
