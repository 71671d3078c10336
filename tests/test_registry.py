"""The model registry (hone.registry) on a private local MLflow: runs, versions, aliases, tags, lookups.

Fast (no Ray, no weights): an export directory is a folder with its hone.json, as train writes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hone import artifacts, registry

from tests.helpers import make_job


@pytest.fixture()
def run(home, tmp_path):
    job = make_job(name="regtest")
    run_dir = tmp_path / "regtest-run"
    export = run_dir / artifacts.EXPORT_DIR
    export.mkdir(parents=True)
    (export / artifacts.EXPORT_INFO).write_text(json.dumps({"kind": "adapter", "task": "causal_lm", "job": job.to_dict()}))
    history = [{"step": 1, "loss": 2.0, "time": 1.0}, {"step": 2, "loss": 1.5, "eval_loss": 1.7, "time": 2.0}]
    run_id = registry.log_run(job, run_dir, export, history, {"step": 2, "loss": 1.5, "eval_loss": 1.7})
    return job, run_dir, export, run_id


def test_versions_aliases_and_lookups(run):
    job, run_dir, export, run_id = run
    assert registry.tracking_uri().startswith("sqlite:///")
    v1 = registry.register_winner("regtest", run_id, export, "eval_loss", 1.7).version
    v2 = registry.register_winner("regtest", run_id, export, "eval_loss", 1.6, sweep="s1").version
    assert (v1, v2) == (1, 2)
    winner = registry.resolve_model_ref("models:/regtest@winner")
    assert winner["version"] == 2 and winner["source"] == str(export) and winner["tags"]["hone.sweep"] == "s1"
    assert registry.resolve_model_ref("models:/regtest/1")["version"] == 1
    registry.promote("regtest", 1, "prod")
    registry.tag_version("regtest", 1, {"hone.note": "kept"})
    assert registry.resolve_model_ref("models:/regtest@prod")["tags"]["hone.note"] == "kept"
    listed = {m["name"]: m for m in registry.list_models()}
    assert listed["regtest"]["latest"] == 2 and {k: int(v) for k, v in listed["regtest"]["aliases"].items()} == {"winner": 2, "prod": 1}
    shown = registry.show_model("regtest")
    assert [v["version"] for v in shown] == [1, 2]
    assert shown[0]["lineage"]["hone.base_model"] == job.model.name and shown[0]["lineage"]["hone.run_dir"] == str(run_dir)
    assert shown[0]["metrics"]["final_eval_loss"] == pytest.approx(1.7)
    # the store was chosen per call: nothing pinned it in the environment that workers and submitted jobs inherit
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_registry_reference_resolves_to_its_export(run):
    _, _, export, run_id = run
    registry.register_winner("regtest", run_id, export, "eval_loss", 1.7)
    spec = artifacts.resolve_ref("models:/regtest@winner")
    assert spec.kind == "export" and spec.path == str(export) and spec.registry["version"] == 1
    assert spec.slug() == "regtest-v1"


def test_unknown_names_versions_and_malformed_refs_are_clear(run):
    with pytest.raises(registry.RegistryError, match="no registered model 'nope' with alias winner"):
        registry.resolve_model_ref("models:/nope@winner")
    with pytest.raises(registry.RegistryError, match="models:/NAME@ALIAS or models:/NAME/VERSION"):
        registry.resolve_model_ref("models:/regtest")
    with pytest.raises(registry.RegistryError, match="no version 9"):
        registry.promote("regtest", 9, "prod")
    with pytest.raises(registry.RegistryError, match="no registered model 'nope'"):
        registry.show_model("nope")


def test_an_external_tracking_uri_with_a_fresh_hone_home(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI names another SQLite store and HONE_HOME is new: the local lock's folder is made when needed."""
    monkeypatch.setenv("HONE_HOME", str(tmp_path / "fresh-home"))
    (tmp_path / "team").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'team' / 'mlflow.db'}")
    assert registry.list_models() == []
    assert (tmp_path / "fresh-home" / "mlflow" / "registry.lock").exists()
    assert not (tmp_path / "fresh-home" / "mlflow" / "mlflow.db").exists()  # the store is the team's, not hone's own


def test_the_winner_alias_moves_only_to_a_better_version(run):
    _, _, export, run_id = run
    first = registry.register_winner("better", run_id, export, "eval_loss", 1.5)
    assert first.alias_moved and first.previous is None
    worse = registry.register_winner("better", run_id, export, "eval_loss", 1.9)
    assert worse.version == 2 and not worse.alias_moved and worse.alias_version == 1
    said = registry.describe(worse, "eval_loss", 1.9)
    assert "@winner stays on v1" in said and "hone models promote" in said
    other_metric = registry.register_winner("better", run_id, export, "eval_accuracy", 0.9)
    assert not other_metric.alias_moved, "a value of another metric is not comparable"
    better = registry.register_winner("better", run_id, export, "eval_loss", 1.2)
    assert better.alias_moved and registry.resolve_model_ref("models:/better@winner")["version"] == better.version == 4
    assert registry.register_winner("better-max", run_id, export, "eval_accuracy", 0.7).alias_moved
    assert registry.register_winner("better-max", run_id, export, "eval_accuracy", 0.8).alias_moved  # higher is better here
    with pytest.raises(registry.RegistryError, match="not finite"):
        registry.register_winner("better", run_id, export, "eval_loss", float("nan"))
    # forcing it: hone models promote
    out = subprocess.run([str(Path(sys.executable).parent / "hone"), "models", "promote", "better", "2"], capture_output=True, text=True,
                         env={**os.environ}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert registry.resolve_model_ref("models:/better@winner")["version"] == 2


CONTENDER = """
import sys, time
from pathlib import Path

from mlflow.tracking import MlflowClient

from hone import registry

name, export, value = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
decided, go, run_id = Path(sys.argv[4]), Path(sys.argv[5]), sys.argv[7]
if sys.argv[6] == "stall":  # decides, then stalls before its first alias write: another sweep registers meanwhile
    original = MlflowClient.set_registered_model_alias
    calls = []

    def stalled(self, *args, **kwargs):
        if not calls:
            calls.append(1)
            decided.touch()
            time.sleep(3)
        return original(self, *args, **kwargs)

    MlflowClient.set_registered_model_alias = stalled
else:
    while not go.exists():
        time.sleep(0.02)
reg = registry.register_winner(name, run_id, export, "eval_loss", value)
print(reg.version, reg.alias_version)
"""


@pytest.fixture()
def mlflow_server(home, tmp_path, monkeypatch):
    """A real ``mlflow server`` (the team-server case: no file lock can serialise its writers) on a free port."""
    import httpx

    from tests.helpers import free_port, stop_group, wait_until

    port = free_port()
    log = tmp_path / "mlflow-server.log"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--default-artifact-root",
                             str(tmp_path / "server-artifacts"), "--workers", "2"],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path)

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, "mlflow server to answer", 120, proc, log, every=0.2)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(proc, signal.SIGTERM)


def test_two_sweeps_racing_on_an_mlflow_server_leave_winner_on_the_better_model(run, mlflow_server, tmp_path):
    """Two processes register at once against a real MLflow server: the one with the worse model read the alias and
    decided to move it, then stalled; the better one registered and moved it meanwhile. Without a re-check after the
    write, the stalled write lands last and @winner ends on the worse model."""
    job, run_dir, export, _ = run
    run_id = registry.log_run(job, run_dir, export, [], {"step": 1, "eval_loss": 1.0})
    with pytest.raises(registry.RegistryError, match="only with the run that made it"):
        registry.register_winner("race", None, export, "eval_loss", 1.0)
    first = registry.register_winner("race", run_id, export, "eval_loss", 1.0)
    assert first.alias_moved and first.version == 1
    # the server keeps a local export as its run's (runs:/RUN/export); hone reads the path from the version's tag
    assert registry.resolve_model_ref("models:/race/1")["source"] == str(export)
    assert artifacts.resolve_ref("models:/race@winner").path == str(export)
    decided, go = tmp_path / "decided", tmp_path / "go"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    worse = subprocess.Popen([sys.executable, "-c", CONTENDER, "race", str(export), "0.8", str(decided), str(go), "stall", run_id], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    better = subprocess.Popen([sys.executable, "-c", CONTENDER, "race", str(export), "0.5", str(decided), str(go), "wait", run_id], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from tests.helpers import wait_until

    wait_until(decided.exists, "the worse model's process to decide", 120, worse)
    go.touch()
    outs = [p.communicate(timeout=120) for p in (worse, better)]
    assert worse.returncode == better.returncode == 0, outs
    (w_version, w_alias), (b_version, b_alias) = [tuple(int(x) for x in out.split()) for out, _ in outs]
    assert w_version == 2 and b_version == 3  # the worse one registered first, then stalled before writing the alias
    final = registry.resolve_model_ref("models:/race@winner")
    assert final["version"] == b_version and final["tags"]["hone.metric_value"] == "0.5"
    assert w_alias == b_alias == b_version  # both report where the alias ended


def test_a_registered_version_loads_only_from_the_model_roots_and_only_as_registered(run, tmp_path, tmp_path_factory):
    """Whoever can write to the registry can point a version anywhere: hone loads it only inside the operator's roots
    (``$HONE_HOME/runs`` and ``HONE_MODEL_ROOTS``) and only with the content recorded at registration."""
    from hone.storage import StorageError

    from tests.helpers import free_port, hone

    _, _, export, run_id = run
    registry.register_winner("regtest", run_id, export, "eval_loss", 1.7)
    assert artifacts.resolve_ref("models:/regtest/1").kind == "export"

    elsewhere = tmp_path_factory.mktemp("elsewhere") / "export"  # outside every root
    elsewhere.mkdir()
    (elsewhere / artifacts.EXPORT_INFO).write_text((export / artifacts.EXPORT_INFO).read_text())
    registry.register_winner("regtest", run_id, elsewhere, "eval_loss", 1.0)  # better: @winner moves to it
    with pytest.raises(artifacts.ArtifactError, match="outside the roots hone loads registered models from .*HONE_MODEL_ROOTS"):
        artifacts.resolve_ref("models:/regtest@winner")
    link = tmp_path / "link"  # a symbolic link inside a root leads nowhere else
    link.symlink_to(elsewhere)
    registry.register_winner("regtest", run_id, link, "eval_loss", 0.9)
    with pytest.raises(artifacts.ArtifactError, match="outside the roots"):
        artifacts.resolve_ref("models:/regtest/3")
    for uri in ("s3://other-bucket/runs/export", "s3://bucket/runs/../../x"):  # buckets the operator did not list
        with pytest.raises((artifacts.ArtifactError, StorageError)):
            artifacts.check_model_source("models:/x/1", uri)
    os.environ["HONE_MODEL_ROOTS"] += ",s3://bucket/runs"  # the fixture's monkeypatch restores it
    artifacts.check_model_source("models:/x/1", "s3://bucket/runs/r1/export")
    with pytest.raises(artifacts.ArtifactError):
        artifacts.check_model_source("models:/x/1", "s3://bucket/runs-other/export")  # a prefix of a name is not a folder

    # hone serve refuses it before any Ray work, naming the setting
    serve_yaml = tmp_path / "serve.yaml"
    serve_yaml.write_text(f"model: models:/regtest@winner\nport: {free_port()}\nmetrics_export_port: {free_port()}\n")
    out = hone("serve", str(serve_yaml), env={**os.environ, "HONE_MODEL_ROOTS": str(tmp_path / "regtest-run")}, timeout=120)
    assert out.returncode != 0 and "HONE_MODEL_ROOTS" in out.stderr + out.stdout and "Traceback" not in out.stderr

    # content changed after registration: refused until the operator records it again
    (export / artifacts.EXPORT_INFO).write_text((export / artifacts.EXPORT_INFO).read_text() + " ")
    with pytest.raises(artifacts.ArtifactError, match="no longer holds what was registered"):
        artifacts.resolve_ref("models:/regtest/1")
    with registry._client() as client:  # a version registered before hone recorded content
        client.delete_model_version_tag("regtest", "1", registry.CONTENT_TAG)
    with pytest.raises(artifacts.ArtifactError, match="hone models trust regtest 1"):
        artifacts.resolve_ref("models:/regtest/1")
    from hone.cli import main

    assert main(["models", "trust", "regtest", "1"]) == 0
    assert artifacts.resolve_ref("models:/regtest/1").path == str(export)
