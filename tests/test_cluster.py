"""Cluster jobs: hone submit / hone jobs over a real Ray Jobs API, and the shipped cluster definitions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.helpers import RAY, hone, wait_until

IMAGE = "ghcr.io/hone-ml/hone:0.1.0"


# --------------------------------------------------------------------------- cluster definitions


def test_launcher_yaml_validates_against_rays_schema(repo):
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((repo / "cluster" / "aws.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    assert len(gpu_types) == 2 and all(t["max_workers"] > t["min_workers"] for t in gpu_types)
    assert config["docker"]["image"].startswith(IMAGE)
    assert all("RAY_AUTH_MODE=token" in " ".join(config[k]) for k in ("head_start_ray_commands", "worker_start_ray_commands"))
    assert "~/.ray/auth_token" in config["file_mounts"]
    broken = {**config, "max_worker": 3}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def _containers(template: dict) -> list[dict]:
    return template["template"]["spec"]["containers"]


def _check_pod(template: dict) -> None:
    """Every container runs as a non-root user that cannot escalate; an in-memory /dev/shm has a size limit."""
    for container in _containers(template):
        sc = container.get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False, container["name"]
        assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), container["name"]
    for volume in template["template"]["spec"].get("volumes", []):
        if (volume.get("emptyDir") or {}).get("medium") == "Memory":
            assert volume["emptyDir"].get("sizeLimit"), volume["name"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"] == {"mode": "token"}, "Ray's token auth must guard the dashboard and the Jobs API"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        _check_pod(group)
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (container,) = _containers(head)
    assert container["image"].startswith(IMAGE) and container["resources"]["limits"]["cpu"]
    ports = {p["containerPort"] for p in container["ports"]}
    assert {6379, 8265, 8000, 8080} <= ports
    assert spec["workerGroupSpecs"]
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (worker,) = _containers(group)
        assert worker["image"].startswith(IMAGE)
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_kuberay_manifests_have_what_kuberay_requires(repo):
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in (repo / "cluster" / "kuberay").glob("*.yaml")}
    assert set(docs) == {"raycluster", "rayjob", "rayservice"}
    for doc in docs.values():
        assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    assert docs["raycluster"]["kind"] == "RayCluster"
    _check_cluster_spec(docs["raycluster"]["spec"])
    job = docs["rayjob"]
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["hone", "train"]
    job_file = Path(entry[2].replace("/opt/hone/", ""))
    assert (repo / job_file).exists(), f"the RayJob runs {entry[2]}, which the image does not carry"
    _check_cluster_spec(job["spec"]["rayClusterSpec"])
    assert docs["rayservice"]["kind"] == "RayService"
    _check_cluster_spec(docs["rayservice"]["spec"]["rayClusterConfig"])


def test_rayservice_serve_config_is_what_hone_emits(repo):
    service = yaml.safe_load((repo / "cluster" / "kuberay" / "rayservice.yaml").read_text())
    out = hone("serve", str(repo / "serving" / "smollm2-winner.yaml"), "--emit-serve-config", cwd=repo, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == yaml.safe_load(out.stdout), \
        "cluster/kuberay/rayservice.yaml is stale: paste `hone serve serving/smollm2-winner.yaml --emit-serve-config`"


def test_dockerfile_builds_the_image_the_definitions_use(repo):
    text = (repo / "Dockerfile").read_text()
    ray_pin = next(line for line in (repo / "pyproject.toml").read_text().splitlines() if '"ray[' in line)
    version = ray_pin.split("==")[1].strip('",')
    assert f"rayproject/ray:{version}-" in text
    assert "torch==2.13.0" in text and "pip install --no-cache-dir -e '.[gpu]'" in text
    assert IMAGE in text
    # engine: vllm replicas run in their own environment, which must have the cluster's Ray version
    assert f'"ray[serve]=={version}"' in text and f'"ray[serve]=={version}"' in (repo / "Makefile").read_text()


# --------------------------------------------------------------------------- submitting to a real cluster


def _alpaca_file(path: Path, n: int = 96) -> Path:
    words = ["a gorgeous, witty film", "a mess from start to end", "moving and wise", "two dull hours"]
    rows = [{"instruction": "Is this review positive or negative?", "input": words[i % 4],
             "output": "positive" if i % 2 == 0 else "negative"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _env(cluster: dict) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **cluster["env"], "HONE_HOME": os.environ["HONE_HOME"]}


def _submit_args(cluster: dict, job: Path, *extra: str) -> list[str]:
    return ["submit", str(job), "--address", cluster["jobs_api"], *extra]


@pytest.mark.slow
def test_submit_runs_a_job_across_two_nodes(cluster, repo, tmp_path):
    data = _alpaca_file(tmp_path / "reviews.jsonl")
    raw = yaml.safe_load((repo / "jobs" / "tiny-smoke.yaml").read_text())
    raw["data"] = {**raw["data"], "source": str(data), "format": "alpaca", "max_samples": None}
    raw["distributed"]["placement_strategy"] = "STRICT_SPREAD"
    raw["training"].update(max_steps=4, eval_every=4, checkpoint_every=4)  # the job's path, not its length, is the subject
    job = tmp_path / "smoke.yaml"
    job.write_text(yaml.safe_dump(raw))
    storage = tmp_path / "runs"
    env = _env(cluster)
    # A team's tracking server travels with the job (and meets the same variable in hone's own session); secrets set
    # here (a hub token, API keys) do not: a runtime_env is readable by anyone with the dashboard.
    (tmp_path / "team-mlflow").mkdir()
    env |= {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'team-mlflow' / 'mlflow.db'}", "HF_TOKEN": "hf_not_a_real_token",
            "HONE_API_KEYS": "sk-not-a-real-key"}

    refused = hone(*_submit_args(cluster, job, "--storage-path", str(storage)), env=env, timeout=120)
    assert refused.returncode == 1
    for text in ("local paths the cluster's nodes cannot see", "data.source", "--upload", "--shared-path", "s3://"):
        assert text in refused.stderr, text

    out = hone(*_submit_args(cluster, job, "--upload", "--storage-path", str(storage), "--follow"), env=env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    sid = out.stdout.split("submitted ", 1)[1].split()[0]
    assert "SUCCEEDED" in out.stdout and "export: " in out.stdout
    export = next(storage.iterdir()) / "export"
    info = json.loads((export / "hone.json").read_text())
    assert len({w["node_id"] for w in info["workers"]}) == 2, info["workers"]
    assert info["job"]["data"]["source"].endswith("files/data_source/reviews.jsonl")  # the uploaded copy was trained on
    from mlflow.tracking import MlflowClient

    logged = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).search_experiments()])
    assert any(r.data.tags.get("hone.export_dir") == str(export) for r in logged)  # tracked in the team's store

    from ray.job_submission import JobSubmissionClient

    sent = JobSubmissionClient(cluster["jobs_api"]).get_job_info(sid).runtime_env or {}
    assert sent["env_vars"]["MLFLOW_TRACKING_URI"] == env["MLFLOW_TRACKING_URI"]
    assert "hf_not_a_real_token" not in json.dumps(sent) and "sk-not-a-real-key" not in json.dumps(sent), sent
    assert "not sent with the job: HONE_API_KEYS, HF_TOKEN" in out.stdout

    # It is an ordinary Ray job: ray's own CLI sees it.
    status = subprocess.run([RAY, "job", "status", sid, "--address", cluster["jobs_api"]], env=env, capture_output=True, text=True)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    listed = hone("jobs", "list", "--address", cluster["jobs_api"], env=env, timeout=60)
    assert sid in listed.stdout and "train" in listed.stdout


def test_submit_fails_fast_and_sends_nothing(tmp_path, repo):
    out = hone("submit", str(repo / "jobs" / "tiny-smoke.yaml"), "--address", "http://127.0.0.1:9", timeout=60)
    assert out.returncode == 1 and "http://127.0.0.1:9" in out.stderr and "cannot reach" in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: builtin:tiny-llama}\ndata: {source: builtin:rotten-tomatoes, format: alpaca}\ntraining: {lr: fast}\n")
    out = hone("submit", str(bad), "--address", "http://127.0.0.1:9", timeout=60)
    assert out.returncode == 2 and "training.lr" in out.stderr  # invalid: rejected before any network call
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = hone("submit", str(repo / "jobs" / "tiny-smoke.yaml"), env=env, timeout=60)
    assert out.returncode == 1 and "RAY_ADDRESS" in out.stderr


def _wait_status(cluster: dict, sid: str, want: str, timeout: float) -> None:
    """Wait for the job to reach ``want`` (one Jobs API client, polled)."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster["jobs_api"])
    wait_until(lambda: str(client.get_job_status(sid)).endswith(want), f"job {sid} to be {want}", timeout=timeout, every=0.5)


@pytest.mark.slow
def test_stop_a_running_job(cluster, repo, tmp_path):
    env = _env(cluster)
    out = hone(*_submit_args(cluster, repo / "jobs" / "tiny-smoke.yaml", "training.max_steps=5000", "--storage-path",
                             str(tmp_path / "runs")), env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    sid = out.stdout.split("submitted ", 1)[1].split()[0]
    _wait_status(cluster, sid, "RUNNING", 180)
    status = hone("jobs", "status", sid, "--address", cluster["jobs_api"], env=env, timeout=60)
    assert "RUNNING" in status.stdout, status.stdout + status.stderr
    stopped = hone("jobs", "stop", sid, "--address", cluster["jobs_api"], env=env, timeout=60)
    assert stopped.returncode == 0 and "stop requested" in stopped.stdout
    _wait_status(cluster, sid, "STOPPED", 120)
    assert "STOPPED" in hone("jobs", "status", sid, "--address", cluster["jobs_api"], env=env, timeout=60).stdout
    logs = hone("jobs", "logs", sid, "--address", cluster["jobs_api"], env=env, timeout=60)
    assert logs.returncode == 0 and "hone train tiny-smoke.yaml" in logs.stdout
