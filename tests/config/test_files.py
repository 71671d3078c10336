"""Every hone YAML says what it is (hone.config.load_file): ``hone validate`` checks jobs, serve configs and
pipelines alike, with every problem reported at once, and ``hone schema --kind`` documents each kind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hone.config import ConfigError, detect_kind, load_file

from tests.helpers import hone

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*(REPO / "jobs").rglob("*.yaml"), *(p for p in (REPO / "serving").glob("*.yaml") if "prometheus" not in p.name)])


def test_every_shipped_yaml_validates_as_its_kind():
    kinds = {path.relative_to(REPO).as_posix(): load_file(path)[0] for path in SHIPPED}
    assert kinds["serving/tiny.yaml"] == "serve" and kinds["jobs/tiny-smoke.yaml"] == "job"
    assert sorted(set(kinds.values())) == ["compare", "job", "pipeline", "serve"], kinds
    assert all(kind == ("compare" if "/compare-" in path else "pipeline") for path, kind in kinds.items() if "pipeline" in path), kinds


def test_hone_validate_takes_each_kind():
    for path, word in ((REPO / "serving" / "tiny.yaml", "serve config 'tiny'"), (REPO / "jobs" / "tiny-smoke.yaml", "job 'tiny-smoke'"),
                       (next(p for p in SHIPPED if p.name.endswith("quickstart-tiny.yaml")), "pipeline quickstart-tiny: sweep")):
        out = hone("validate", str(path))
        assert out.returncode == 0 and out.stdout.startswith(f"ok: {path}") and word in out.stdout, out.stdout + out.stderr
    out = hone("validate", str(REPO / "serving" / "tiny.yaml"), "port=8123", "--print")
    assert out.returncode == 0 and "port: 8123" in out.stdout and "model: builtin:tiny-llama" in out.stdout


def test_kind_by_key_or_by_shape():
    assert detect_kind({"kind": "serve", "model": {"name": "x"}}) == "serve"
    assert detect_kind({"train": {"job": "j.yaml"}}) == "pipeline"
    assert detect_kind({"model": "builtin:tiny-llama"}) == "serve"
    assert detect_kind({"model": {"name": "builtin:tiny-llama"}, "data": {}}) == "job"
    with pytest.raises(ConfigError, match="unknown kind 'jobb'"):
        detect_kind({"kind": "jobb"})


def test_a_broken_serve_config_reports_every_problem(tmp_path):
    bad = tmp_path / "serve.yaml"
    bad.write_text("kind: serve\nmodel: builtin:tiny-llama\nprot: 8000\nquantization: int7\nroute_prefix: v1\n"
                   "num_replicas: 2\nautoscaling_config: {max_replicas: 0}\n")
    out = hone("validate", str(bad), "max_batch_size=0")
    assert out.returncode == 2, out.stdout + out.stderr
    for text in ("problems in the serve config", "prot: unknown key", "did you mean 'port'?", "quantization", "route_prefix",
                 "autoscaling_config", "max_batch_size"):
        assert text in out.stderr, (text, out.stderr)
    assert "Traceback" not in out.stderr


def test_a_broken_pipeline_reports_every_problem(tmp_path):
    (tmp_path / "job.yaml").write_text("model: {name: builtin:tiny-llama}\ndata: {source: builtin:rotten-tomatoes, format: alpaca}\n"
                                       "training: {lrr: 1}\n")
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("name: ../escape\ntrain: {job: job.yaml}\nquantize: {method: int7, eval_rows: 0}\nsmoke_test: {requets: 4}\n")
    out = hone("validate", str(bad))
    assert out.returncode == 2, out.stdout + out.stderr
    for text in ("problems in the pipeline", "- name:", "quantize.method", "quantize.eval_rows", "smoke_test.requets",
                 "did you mean 'requests'?",
                 "train.job", "training.lrr"):
        assert text in out.stderr, (text, out.stderr)
    out = hone("validate", str(bad), "serve.prot=1", "serve.max_batch_size=0")
    assert out.returncode == 2 and "serve.prot: unknown key" in out.stderr and "serve.max_batch_size" in out.stderr, out.stderr
    assert "quantize.method" in out.stderr and "training.lrr" in out.stderr  # still every problem at once


def test_schema_for_each_kind(tmp_path):
    for kind, field in (("job", "training"), ("serve", "autoscaling_config"), ("pipeline", "smoke_test")):
        out = hone("schema", "--kind", kind)
        assert out.returncode == 0, out.stderr
        schema = json.loads(out.stdout)
        assert schema["title"] == f"hone {kind}" and field in schema["properties"] and "kind" in schema["properties"]
    out = hone("schema", "--kind", "serve", "--markdown")
    assert out.returncode == 0 and "#### `(top level)` — A model served on Ray Serve" in out.stdout
