"""Cluster scale, on cluster/local.sh: a run kept in object storage (a real S3 server, moto, on 127.0.0.1) and an elastic
run that loses a worker node mid-run and gets it back."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hone.config import validate_job

HONE = str(Path(sys.executable).parent / "hone")
BUCKET = "hone-test"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, what: str, timeout: float = 300.0, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}:\n" + (log.read_text()[-4000:] if log else ""))
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}" + (":\n" + log.read_text()[-4000:] if log else ""))
        time.sleep(0.5)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with a bucket holding the training data; the AWS variables that reach it."""
    import boto3

    port = _free_port()
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

        _wait(up, "the S3 server", 60)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        rows = [{"instruction": "Label the review", "input": f"review {i}: " + ("good " if i % 2 else "bad ") * (1 + i % 5),
                 "output": "positive" if i % 2 else "negative"} for i in range(400)]
        client.put_object(Bucket=BUCKET, Key="data/reviews.jsonl", Body="".join(json.dumps(r) + "\n" for r in rows).encode())
        yield {"env": env, "client": client}
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
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


def _losses(lines: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in lines.splitlines():
        if line.strip():
            m = json.loads(line)
            out.setdefault(int(m["step"]), []).append(m["loss"])
    return out


def _env(cluster, home: Path, extra: dict) -> dict:
    return {**cluster["env"], "HONE_HOME": str(home), "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", **extra}


def _own_home(tmp: Path) -> Path:
    """A hone home of its own (nothing local is shared with the test's), with the shared built-in model cache."""
    home = tmp / "home"
    home.mkdir()
    (home / "models").symlink_to(Path(os.environ["HONE_HOME"]) / "models")
    return home


@pytest.mark.slow
def test_a_run_in_object_storage_resumes_exports_registers_and_serves(cluster, s3, tmp_path):
    """Data, the tokenised cache, checkpoints, metrics, the export and the quantised artifact live in S3; the local mirror
    is deleted between every stage (interruption → resume → register → quantise → serve), so each reads the store."""
    client = s3["client"]
    job = tmp_path / "s3.yaml"
    job.write_text(yaml.safe_dump(_job("s3run", data={"source": f"s3://{BUCKET}/data/reviews.jsonl", "validation": 0.1})))
    home = _own_home(tmp_path)
    env = _env(cluster, home, s3["env"])
    runs = f"s3://{BUCKET}/runs"
    proc = subprocess.Popen([HONE, "train", str(job), "--address", cluster["address"], "--storage-path", runs], env=env,
                            stdout=open(tmp_path / "first.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    mirror = home / "remote" / "s3" / BUCKET / "runs"
    try:
        _wait(lambda: mirror.is_dir() and any(p.name.startswith("s3run") for p in mirror.iterdir()), "the run's folder", 300, proc,
              tmp_path / "first.log")
        run = next(p.name for p in mirror.iterdir() if p.name.startswith("s3run"))
        key = f"runs/{run}/metrics.jsonl"

        def logged(step: int) -> bool:
            try:
                body = client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
            except client.exceptions.NoSuchKey:
                return False
            return max(_losses(body), default=0) >= step

        _wait(lambda: logged(5), "step 5 in the store's metrics.jsonl", 600, proc, tmp_path / "first.log")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = (tmp_path / "first.log").read_text()
    assert "tokenised on Ray Data" in first, first[-3000:]
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/")["Contents"]]
    assert any(k.startswith(f"runs/{run}/checkpoint_") for k in objects), objects
    assert any(k.startswith("runs/.hone-data/") and k.endswith("manifest.json") for k in objects), objects
    assert not any(k.startswith(f"runs/{run}/export/") for k in objects)
    shutil.rmtree(home / "remote")  # nothing of the run is left on this machine

    out = subprocess.run([HONE, "train", "--resume", f"{runs}/{run}", "--address", cluster["address"]], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed at step 4/10" in out.stdout and "data (cached" in out.stdout, out.stdout[-3000:]
    history = _losses(client.get_object(Bucket=BUCKET, Key=f"runs/{run}/metrics.jsonl")["Body"].read().decode())
    assert sorted(history) == list(range(1, 11))
    assert abs(history[5][0] - history[5][-1]) < 1e-5, history[5]  # step 5 before the kill and after the resume
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{run}/export/")["Contents"]]
    assert f"runs/{run}/export/hone.json" in objects and f"runs/{run}/export/adapter_model.safetensors" in objects

    # registered (the version's source is the export in the store) and served from there by a fresh hone home
    probe = """
import json, sys
from pathlib import Path
from hone import registry
from hone.artifacts import EXPORT_DIR, resolve_run_dir
run = resolve_run_dir(sys.argv[1])
meta = json.loads((run / "hone-run.json").read_text())
export = run / EXPORT_DIR
reg = registry.register_winner("s3-tiny", meta["mlflow_run_id"], export, "eval_loss", meta["metrics"]["eval_loss"])
print(json.dumps(registry.resolve_model_ref("models:/s3-tiny@winner")))
"""
    reg = subprocess.run([sys.executable, "-c", probe, f"{runs}/{run}"], env=env, capture_output=True, text=True, timeout=300)
    assert reg.returncode == 0, reg.stdout[-2000:] + reg.stderr[-3000:]
    assert json.loads(reg.stdout.strip().splitlines()[-1])["source"] == f"{runs}/{run}/export"
    shutil.rmtree(home / "remote")
    quantized = f"s3://{BUCKET}/quantized/s3-tiny"
    q = subprocess.run([HONE, "quantize", "models:/s3-tiny@winner", "--method", "int8-dynamic", "--out", quantized, "-n", "8",
                        "--max-loss-increase", "0.5", "--max-accuracy-drop", "none"], env=env, capture_output=True, text=True, timeout=600)
    assert q.returncode == 0, q.stdout[-3000:] + q.stderr[-3000:]
    tags = subprocess.run([sys.executable, "-c", "from hone import registry; import json; "
                           "print(json.dumps(registry.resolve_model_ref('models:/s3-tiny@winner')['tags']))"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(tags.stdout.strip().splitlines()[-1])["hone.quantized.int8-dynamic"] == quantized, tags.stdout + tags.stderr
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="quantized/s3-tiny/")["Contents"]]
    assert "quantized/s3-tiny/quantization.json" in keys, keys
    shutil.rmtree(home / "remote")
    sys.path.insert(0, str(REPO / "tests" / "serving"))
    from servers import free_port, start, stop

    cfg = {"name": "s3", "model": quantized, "served_model_name": "s3-tiny", "port": free_port(), "metrics_export_port": free_port(),
           "max_tokens_default": 8, "ray_actor_options": {"num_cpus": 0.25}}
    serve_dir = tmp_path / "serve"
    serve_dir.mkdir()
    proc, info = start(cfg, serve_dir, {k: v for k, v in env.items() if k not in ("RAY_ADDRESS",)})
    try:
        import httpx

        r = httpx.post(info["url"] + "/v1/completions", json={"model": "s3-tiny", "prompt": "The movie was", "max_tokens": 4}, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None, r.text
    finally:
        stop(proc)
    assert (home / "remote" / "s3" / BUCKET / "quantized" / "s3-tiny" / "quantization.json").exists()  # fetched to serve


def test_object_store_paths_are_checked_before_any_ray_work(s3, tmp_path):
    from hone.config import JobConfigError

    with pytest.raises(JobConfigError, match="bucket 'no-such-bucket' does not exist"):
        validate_job(_job("bad", training={"storage_path": "s3://no-such-bucket/runs"}))
    with pytest.raises(JobConfigError, match="no object matches"):
        validate_job(_job("bad", data={"source": f"s3://{BUCKET}/data/missing.jsonl"}))
    with pytest.raises(JobConfigError, match="unknown storage scheme 'ftp'"):
        validate_job(_job("bad", data={"source": "ftp://host/x.jsonl"}))
    out = subprocess.run([HONE, "train", str(REPO / "jobs" / "tiny-smoke.yaml"), "--storage-path", "s3://no-such-bucket/runs"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "no-such-bucket" in out.stderr + out.stdout and "Traceback" not in out.stderr


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.slow
def test_elastic_run_loses_a_node_continues_and_grows_back(cluster, tmp_path):
    """num_workers [1, 2], one worker per worker node: node 2 is killed mid-run, the run goes on with one worker
    accumulating both micro-batches, node 2 rejoins and the run grows back to two; every step's loss matches an
    uninterrupted run's."""
    script = str(REPO / "cluster" / "local.sh")
    steps = 60
    raw = _job("elastic", distributed={"num_workers": [1, 2], "deepspeed": None, "max_failures": 5,
                                       "resources_per_worker": {"CPU": 1, "hone_node": 1}},
               training={"max_steps": steps, "checkpoint_every": 2})
    validate_job(raw)
    job = tmp_path / "elastic.yaml"
    job.write_text(yaml.safe_dump(raw))
    # Ray Train waits this long for a worker group it believes fits (the dead node still counts for a moment)
    env = _env(cluster, Path(os.environ["HONE_HOME"]), {"HONE_ELASTIC_RESIZE_S": "3", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"})
    reference = tmp_path / "reference"
    out = subprocess.run([HONE, "train", str(job), "--address", cluster["address"], "--storage-path", str(reference)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    expected = {k: v[-1] for k, v in _losses(next(reference.iterdir()).joinpath("metrics.jsonl").read_text()).items()}

    storage = tmp_path / "elastic"
    log_path = tmp_path / "elastic.log"
    proc = subprocess.Popen([HONE, "train", str(job), "--address", cluster["address"], "--storage-path", str(storage)], env=env,
                            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    node_env = cluster["env"]
    try:
        _wait(lambda: storage.is_dir() and any(storage.iterdir()), "the run folder", 300, proc, log_path)
        metrics = next(storage.iterdir()) / "metrics.jsonl"
        _wait(lambda: any(r["step"] >= 5 for r in _records(metrics)), "step 5", 600, proc, log_path)
        stopped = subprocess.run([script, "stop-node", "2"], env=node_env, capture_output=True, text=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        _wait(lambda: any(r.get("workers") == 1 for r in _records(metrics)), "steps on one worker", 300, proc, log_path)
        started = subprocess.run([script, "start-node", "2"], env=node_env, capture_output=True, text=True)
        assert started.returncode == 0, started.stdout + started.stderr
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        subprocess.run([script, "start-node", "2"], env=node_env, capture_output=True)  # leave the cluster whole
    text = log_path.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "on 1 worker(s) (was 2), 2 micro-batch(es) each" in text, text[-4000:]
    sizes = [r["workers"] for r in _records(metrics)]
    first_one = sizes.index(1)
    assert 2 in sizes[:first_one] and 2 in sizes[first_one:], sizes  # shrank, then grew back once node 2 rejoined
    got = {k: v[-1] for k, v in _losses(metrics.read_text()).items()}
    assert sorted(got) == list(range(1, steps + 1))
    for step in range(1, steps + 1):
        assert abs(got[step] - expected[step]) < 1e-4 * max(1.0, abs(expected[step])), (step, got[step], expected[step])
