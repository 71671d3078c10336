"""The artifact layout and model references (hone.artifacts): one resolver, one metrics.jsonl rule, atomic publishing.

Fast: plain files on disk, no Ray and no model weights (the registry case lives in test_registry.py)."""

from __future__ import annotations

import json

import pytest

from hone import artifacts
from hone.artifacts import ArtifactError, MetricsFollower, ModelSpec, append_metrics, read_metrics, resolve_ref

from tests.helpers import make_job


def _export(folder, job, kind="adapter"):
    folder.mkdir(parents=True)
    (folder / artifacts.EXPORT_INFO).write_text(json.dumps({"kind": kind, "task": job.task.type, "job": job.to_dict()}))
    return folder


def test_builtins_and_hub_ids_are_plain_models():
    spec = resolve_ref("builtin:tiny-llama")
    assert (spec.kind, spec.path, spec.task, spec.job, spec.registry) == ("model", "builtin:tiny-llama", "causal_lm", None, None)
    assert resolve_ref("builtin:minilm").task == "sequence_classification"
    assert resolve_ref("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "model"  # a hub id passes through unchanged
    with pytest.raises(ValueError, match="did you mean 'builtin:tiny-llama'"):
        resolve_ref("builtin:tiny-lama")


def test_an_export_carries_its_job_and_labels(tmp_path):
    job = make_job(task={"type": "sequence_classification", "labels": ["neg", "pos"]},
                   data={"format": "classification", "prompt_template": "alpaca"})
    spec = resolve_ref(str(_export(tmp_path / "export", job)))
    assert spec.kind == "export" and spec.adapter and spec.task == "sequence_classification"
    assert spec.job == job and spec.labels == ["neg", "pos"]


def test_a_run_resolves_to_its_export_by_directory_or_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_HOME", str(tmp_path / "home"))
    run = artifacts.default_storage() / "tiny-20260101-000000"
    run.mkdir(parents=True)
    job = make_job()
    (run / artifacts.JOB_FILE).write_text(job.to_yaml())
    _export(run / artifacts.EXPORT_DIR, job, kind="model")
    by_name = resolve_ref("tiny-20260101-000000")
    assert by_name.kind == "export" and by_name.path == str(run.resolve() / artifacts.EXPORT_DIR) and not by_name.adapter
    assert resolve_ref(str(run)).path == by_name.path
    assert resolve_ref(str(run / artifacts.EXPORT_DIR)) == ModelSpec(str(run / artifacts.EXPORT_DIR), "export",
                                                                       str(run / artifacts.EXPORT_DIR), "causal_lm")
    assert artifacts.resolve_run_dir("tiny-20260101-000000") == run.resolve()
    with pytest.raises(ArtifactError, match="no hone run at 'nope'"):
        artifacts.resolve_run_dir("nope")


def test_a_quantised_artifact_is_recognised(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    (folder / artifacts.QUANTIZED_INFO).write_text(json.dumps({"method": "int8-dynamic", "task": "causal_lm", "gate": {"passed": True},
                                                               "job": make_job().to_dict()}))
    spec = resolve_ref(str(folder))
    assert spec.kind == "quantized" and spec.info["method"] == "int8-dynamic" and spec.job is not None


def test_slugs_are_stable_and_distinct(tmp_path):
    a = resolve_ref(str(_export(tmp_path / "a" / "export", make_job())))
    b = resolve_ref(str(_export(tmp_path / "b" / "export", make_job())))
    assert a.slug() == resolve_ref(a.path).slug() and a.slug() != b.slug() and a.slug().startswith("export-")
    assert artifacts.quantized_dir(a, "int8-dynamic").name == f"{a.slug()}-int8-dynamic"


def test_metrics_log_one_rule_for_every_reader(tmp_path):
    assert read_metrics(tmp_path) == []
    follower = MetricsFollower(tmp_path)
    for step, loss in ((1, 3.0), (2, 2.0), (3, 1.5)):
        append_metrics(tmp_path, {"step": step, "loss": loss})
    assert [m["step"] for m in follower.new()] == [1, 2, 3] and follower.new() == []
    # a resumed run repeats the steps after its checkpoint; a blank line; a record still being written
    with open(tmp_path / artifacts.METRICS_FILE, "a") as fh:
        fh.write('{"step": 3, "loss": 1.4}\n\n{"step": 4, "loss"')
    history = read_metrics(tmp_path)
    assert [(m["step"], m["loss"]) for m in history] == [(1, 3.0), (2, 2.0), (3, 1.4)]
    assert [m["step"] for m in follower.new()] == [3]  # the half-written line is not read yet
    with open(tmp_path / artifacts.METRICS_FILE, "a") as fh:
        fh.write(': 1.2}\n')
    assert follower.new() == [{"step": 4, "loss": 1.2}]
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_publish_dir_replaces_whole_directories(tmp_path):
    final = tmp_path / "export"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged = tmp_path / ".export.partial"
    staged.mkdir()
    (staged / "new.txt").write_text("new")
    artifacts.publish_dir(staged, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (final / "new.txt").read_text() == "new"


def test_run_storage_order(tmp_path, monkeypatch):
    monkeypatch.setenv("HONE_HOME", str(tmp_path / "home"))
    job = make_job(training={"storage_path": str(tmp_path / "job-storage")})
    assert artifacts.run_storage(str(tmp_path / "cli"), job) == (tmp_path / "cli").resolve()
    assert artifacts.run_storage(None, job) == (tmp_path / "job-storage").resolve()
    assert artifacts.run_storage(None, make_job()) == (tmp_path / "home" / "runs").resolve()
