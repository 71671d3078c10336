"""The `hone` CLI as a user runs it: a subprocess of the installed console script."""

from __future__ import annotations

import json

from tests.helpers import hone


def test_validate_ok(repo):
    out = hone("validate", str(repo / "jobs" / "tiny-smoke.yaml"), "training.lr=1e-4")
    assert out.returncode == 0, out.stderr
    assert "ok:" in out.stdout and "tiny-smoke" in out.stdout


def test_validate_print_shows_resolved_defaults(repo):
    out = hone("validate", str(repo / "jobs" / "tiny-smoke.yaml"), "--print")
    assert out.returncode == 0
    assert "max_grad_norm: 1.0" in out.stdout and "trust_remote_code: false" in out.stdout


def test_validate_reports_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name: builtin:tiny-llama}\n"
        "data: {source: nowhere/train.jsonl, format: alpaca}\n"
        "training: {lrr: 1.0e-4}\n"
        "distributed: {deepspeed: {stage: 9}}\n"
    )
    out = hone("validate", str(bad), "method.type=qlora")
    assert out.returncode == 2
    for text in ("3 problems", "training.lrr", "did you mean 'lr'", "distributed.deepspeed.stage", "data.source", "does not exist"):
        assert text in out.stderr, (text, out.stderr)
    assert "Traceback" not in out.stderr


def test_validate_missing_file():
    out = hone("validate", "no/such/job.yaml")
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_schema_is_json(tmp_path):
    out = hone("schema")
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert schema["title"] == "hone job" and "training" in schema["properties"]
    assert hone("schema", "-o", str(tmp_path / "s.json")).returncode == 0
    assert json.loads((tmp_path / "s.json").read_text()) == schema


def test_data_preview_marks_trained_tokens(repo):
    out = hone("data", "preview", str(repo / "jobs" / "tiny-smoke.yaml"), "-n", "2", "data.max_length=256")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("── example") == 2
    assert "⟦positive<|im_end|>" in out.stdout or "⟦negative<|im_end|>" in out.stdout
    assert "<|im_start|>user\nClassify the sentiment" in out.stdout
    assert "train (these 2 rows): 2 rows in" in out.stdout


def test_data_preview_classification(repo):
    out = hone("data", "preview", str(repo / "jobs" / "classify-minilm-sentiment.yaml"), "-n", "1", "--split", "validation")
    assert out.returncode == 0, out.stderr
    assert "→ label" in out.stdout and ("(positive)" in out.stdout or "(negative)" in out.stdout)


def test_data_error_is_a_clear_message(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "answer": "b"}\n')
    job = tmp_path / "j.yaml"
    job.write_text(f"model: {{name: builtin:tiny-llama}}\ndata: {{source: {data}, format: alpaca, validation: null}}\n")
    out = hone("data", "preview", str(job))
    assert out.returncode == 1
    assert "data.columns.instruction" in out.stderr and "Traceback" not in out.stderr


def test_builtins_lists_assets():
    out = hone("builtins")
    assert out.returncode == 0 and "builtin:smollm2-135m-instruct" in out.stdout and "builtin:rotten-tomatoes" in out.stdout
