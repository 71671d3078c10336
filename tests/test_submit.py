"""``hone submit``'s checks before anything is sent (hone.submit): addresses, and the local paths a cluster cannot see.

Fast: no cluster (tests/test_cluster.py submits to a real one). The address used here is never reached: every
refusal below happens before the first network call."""

from __future__ import annotations

import pytest

from hone.submit import SubmitError, local_paths, resolve_address, submit

NOWHERE = "http://127.0.0.1:9"


def test_addresses(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address("http://head:8265/") == "http://head:8265"
    assert resolve_address("ray://head:10001") == "http://head:8265"
    assert resolve_address("10.0.0.5:6379") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert resolve_address(None) == "http://head:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SubmitError, match="RAY_ADDRESS"):
        resolve_address(None)


def test_local_paths_of_jobs_and_serve_configs(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("{}\n")
    job = {"model": {"name": "builtin:tiny-llama"}, "data": {"source": str(data), "validation": "./val.jsonl", "test": 0.1}}
    assert local_paths(job, "job") == [("data.source", str(data)), ("data.validation", "./val.jsonl")]
    remote = {"model": "Qwen/Qwen2.5-0.5B", "data": {"source": "s3://bucket/train.jsonl"}}
    assert local_paths(remote, "job") == []
    serve = {"model": "models:/m@winner", "api_keys_file": "/etc/hone/keys", "adapters": {"a": "~/adapters/a"}}
    assert local_paths(serve, "serve") == [("api_keys_file", "/etc/hone/keys"), ("adapters.a", "~/adapters/a")]


def _job_with_local_data(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n' * 4)
    path = tmp_path / "job.yaml"
    path.write_text(f"model: {{name: builtin:tiny-llama}}\ndata: {{source: {data}, format: text}}\n")
    return path, data


def test_local_data_is_refused_before_contacting_the_cluster(tmp_path):
    path, data = _job_with_local_data(tmp_path)
    with pytest.raises(SubmitError) as e:
        submit(str(path), address=NOWHERE)
    assert f"data.source: {data}" in str(e.value) and "--shared-path" in str(e.value) and "--upload" in str(e.value)


def test_shared_paths_pass_the_check_and_reach_the_network(tmp_path):
    path, _ = _job_with_local_data(tmp_path)
    with pytest.raises(SubmitError, match="cannot reach the Ray Jobs API at http://127.0.0.1:9"):
        submit(str(path), address=NOWHERE, shared_paths=[str(tmp_path)])


def test_secrets_never_travel_in_the_runtime_env():
    from hone.submit import SECRETS, job_env

    here = {"HF_TOKEN": "hf_x", "HONE_API_KEYS": "k1", "AWS_SECRET_ACCESS_KEY": "s", "MLFLOW_TRACKING_URI": "http://mlflow:5000",
            "HONE_DEBUG": "1", "PATH": "/bin"}
    env, withheld = job_env(here)
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HONE_DEBUG": "1"}
    assert set(withheld) == {"HF_TOKEN", "HONE_API_KEYS", "AWS_SECRET_ACCESS_KEY"} and not set(env) & set(SECRETS)
    with pytest.raises(SubmitError, match="carries credentials"):
        job_env({"MLFLOW_TRACKING_URI": "https://alice:hunter2@mlflow.example.com"})


def test_upload_keeps_every_shard_of_a_glob_and_shared_paths_compare_as_paths(tmp_path, monkeypatch):
    """``data/*/train.jsonl`` uploads each shard at its own path (they used to overwrite one another: the job trained
    on one); an absolute glob works too; ``/x/data2`` is not under a shared ``/x/data``."""
    import glob

    from hone.submit import stage_uploads

    for shard in ("a", "b"):
        (tmp_path / "data" / shard).mkdir(parents=True)
        (tmp_path / "data" / shard / "train.jsonl").write_text(f'{{"text": "{shard}"}}\n')
    monkeypatch.chdir(tmp_path)
    for pattern in ("data/*/train.jsonl", str(tmp_path / "data" / "*" / "train.jsonl")):
        work = tmp_path / f"work-{len(pattern)}"
        raw = {"data": {"source": pattern}}
        stage_uploads([("data.source", pattern)], raw, work)
        copies = sorted(glob.glob(str(work / raw["data"]["source"])))
        assert [open(c).read() for c in copies] == ['{"text": "a"}\n', '{"text": "b"}\n'], (raw, copies)
        assert raw["data"]["source"] == "files/data_source/*/train.jsonl"
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "train.jsonl").write_text('{"text": "c"}\n')
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {{name: builtin:tiny-llama}}\ndata: {{source: {tmp_path / 'data2' / 'train.jsonl'}, format: text}}\n")
    with pytest.raises(SubmitError, match="--shared-path"):  # not under the shared folder: refused before the network
        submit(str(job), address=NOWHERE, shared_paths=[str(tmp_path / "data")])
