"""The job schema: defaults, every bad case with its message, overrides, search spaces, JSON schema."""

from __future__ import annotations

import pytest
import yaml

from hone.config import JobConfigError, apply_overrides, json_schema, load_job, validate_job

from tests.helpers import make_job

BASE = {
    "model": {"name": "builtin:tiny-llama"},
    "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca"},
}


def problems(raw) -> dict[str, str]:
    with pytest.raises(JobConfigError) as info:
        validate_job(raw)
    return {p.path: f"{p.message} | {p.hint}" for p in info.value.problems}


def with_(**sections):
    raw = {k: dict(v) for k, v in BASE.items()}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def test_minimal_job_gets_documented_defaults():
    job = validate_job(BASE)
    assert job.task.type == "causal_lm"
    assert job.method.type == "lora" and job.method.lora.r == 8
    assert job.distributed.deepspeed.stage == 2
    assert job.distributed.num_workers == 1 and not job.distributed.use_gpu
    assert job.precision == "fp32"
    assert job.data.train_on_inputs is False
    assert job.model.trust_remote_code is False


def test_gpu_job_defaults_to_bf16():
    assert validate_job(with_(distributed={"use_gpu": True})).precision == "bf16"


def test_shorthands_for_task_and_method():
    job = validate_job(with_(task="causal_lm", method="full"))
    assert job.task.type == "causal_lm" and job.method.type == "full"


def test_unknown_key_suggests_the_right_one():
    found = problems(with_(training={"lrr": 1e-4}))
    assert "training.lrr" in found
    assert "unknown key" in found["training.lrr"] and "did you mean 'lr'" in found["training.lrr"]


def test_unknown_top_level_section_suggests():
    found = problems({**BASE, "trainng": {}})
    assert "did you mean 'training'" in found["trainng"]


def test_wrong_type_names_the_value():
    found = problems(with_(training={"lr": "fast"}))
    assert "valid number" in found["training.lr"] and "'fast'" in found["training.lr"]


def test_qlora_without_gpu_is_rejected_with_a_hint():
    found = problems(with_(method={"type": "qlora"}))
    assert "CUDA GPU" in found["method.type"] and "use_gpu: true" in found["method.type"]
    assert validate_job(with_(method={"type": "qlora"}, distributed={"use_gpu": True})).method.qlora.bits == 4


def test_zero_stage_out_of_range():
    found = problems(with_(distributed={"deepspeed": {"stage": 4}}))
    assert "less than or equal to 3" in found["distributed.deepspeed.stage"]
    assert "ZeRO stages are 0" in found["distributed.deepspeed.stage"]


def test_param_offload_needs_stage_3():
    found = problems(with_(distributed={"deepspeed": {"stage": 2, "offload_param": "cpu"}}))
    assert "stage 3" in found["distributed.deepspeed"]
    job = validate_job(with_(distributed={"deepspeed": {"stage": 3, "offload_param": "cpu", "offload_optimizer": "cpu"}}))
    assert job.distributed.deepspeed.offload_param == "cpu"


def test_classification_needs_num_labels():
    found = problems(with_(task={"type": "sequence_classification"}, data={"format": "classification"}))
    assert "num_labels" in found["task"]


def test_classification_labels_set_num_labels():
    job = validate_job(with_(task={"type": "sequence_classification", "labels": ["neg", "pos"]}, data={"format": "classification"}))
    assert job.task.num_labels == 2


def test_missing_data_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = problems(with_(data={"source": "data/train.jsonl"}))
    assert "does not exist" in found["data.source"]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    assert validate_job(with_(data={"source": "data/train.jsonl", "format": "text"})).data.source == "data/train.jsonl"


def test_unknown_builtin_suggests():
    found = problems(with_(model={"name": "builtin:tiny-lama"}))
    assert "did you mean 'builtin:tiny-llama'" in found["model.name"]


def test_bf16_on_cpu_rejected():
    assert "GPU workers" in problems(with_(training={"precision": "bf16"}))["training.precision"]


def test_task_and_format_must_agree():
    found = problems(with_(task={"type": "sequence_classification", "num_labels": 2}))
    assert "data.format" in found and "classification" in found["data.format"]


def test_method_sections_must_match_type():
    found = problems(with_(method={"type": "lora", "ia3": {}}))
    assert "ia3" in found["method"]


def test_every_problem_is_reported_at_once():
    raw = with_(training={"lrr": 1, "epochs": -1}, distributed={"deepspeed": {"stage": 7}}, method={"type": "qlora"})
    found = problems(raw)
    assert {"training.lrr", "training.epochs", "distributed.deepspeed.stage"} <= set(found)
    with pytest.raises(JobConfigError) as info:
        validate_job(raw)
    text = str(info.value)
    assert "problems in the job" in text and "training.lrr" in text and "distributed.deepspeed.stage" in text


def test_names_that_become_folders_are_one_folder_name():
    """A job's name and its output name name folders under the storage path: one segment, never ``..`` or ``/``."""
    for bad in ("../escape", "runs/x", ".hidden"):
        assert "name" in problems(with_(name=bad))
        assert "training.output_name" in problems(with_(training={"output_name": bad}))
    assert validate_job(with_(training={"output_name": "sft-v2.1"})).run_name == "sft-v2.1"


def test_job_must_be_a_mapping():
    with pytest.raises(JobConfigError, match="mapping"):
        validate_job(["not", "a", "job"])


# --------------------------------------------------------------------------- overrides


def test_overrides_are_typed_by_the_schema(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    job = load_job(path, ["training.lr=1e-4", "method.lora.r=16", "distributed.deepspeed=null", "data.max_length=64",
                          "method.lora.target_modules=[q_proj,v_proj]"])
    assert job.name == "job"  # from the file stem
    assert job.training.lr == pytest.approx(1e-4) and isinstance(job.training.lr, float)
    assert job.method.lora.r == 16
    assert job.distributed.deepspeed is None
    assert job.method.lora.target_modules == ["q_proj", "v_proj"]


def test_override_into_shorthand_section():
    raw = apply_overrides({**BASE, "method": "lora"}, ["method.lora.r=4"])
    assert validate_job(raw).method.lora.r == 4


def test_override_unknown_path_and_bad_syntax():
    with pytest.raises(JobConfigError) as info:
        apply_overrides(BASE, ["training.lrr=1", "novalue"])
    found = {p.path: p for p in info.value.problems}
    assert "did you mean 'training.lr'" in found["training.lrr"].hint
    assert "key.path=value" in found["novalue"].message


def test_override_wrong_type(tmp_path):
    path = tmp_path / "j.yaml"
    path.write_text(yaml.safe_dump(BASE))
    with pytest.raises(JobConfigError, match="training.batch_size"):
        load_job(path, ["training.batch_size=abc"])


# --------------------------------------------------------------------------- search spaces


def test_valid_search_space():
    job = validate_job(with_(tune={"search_space": {"training.lr": {"loguniform": [1e-5, 1e-3]}, "method.lora.r": {"choice": [4, 8, 16]}},
                                   "metric": "eval_loss"}))
    assert job.tune.mode == "min"
    assert job.tune.search_space["method.lora.r"].candidates() == [4, 8, 16]


@pytest.mark.parametrize(
    "space, path, text",
    [
        ({"training.lrr": {"choice": [1e-4]}}, "tune.search_space.training.lrr", "did you mean 'training.lr'"),
        ({"method.lora.r": {"choice": []}}, "tune.search_space.method.lora.r", "empty"),
        ({"method.lora.r": {"choice": ["big"]}}, "tune.search_space.method.lora.r", "'big' is invalid"),
        ({"distributed.deepspeed.stage": {"grid": [2, 4]}}, "tune.search_space.distributed.deepspeed.stage", "value 4 is invalid"),
        ({"training.lr": {"loguniform": [0, 1e-3]}}, "tune.search_space.training.lr", "positive"),
        ({"training.lr": {"uniform": [1e-3, 1e-5]}}, "tune.search_space.training.lr", "low < high"),
        ({"training.lr": {"uniform": [1e-5, 1e-3], "choice": [1]}}, "tune.search_space.training.lr", "exactly one"),
    ],
)
def test_invalid_search_spaces(space, path, text):
    found = problems(with_(tune={"search_space": space}))
    assert path in found, found
    assert text in found[path]


def test_tune_metric_must_fit_the_task():
    found = problems(with_(tune={"metric": "eval_f1"}))
    assert "tune.metric" in found


# --------------------------------------------------------------------------- JSON schema


def test_json_schema_documents_every_section():
    schema = json_schema()
    assert set(schema["properties"]) >= {"model", "task", "data", "method", "distributed", "training", "tune"}
    training = schema["$defs"]["TrainingConfig"]["properties"]
    assert "Peak learning rate" in training["lr"]["description"]
    assert schema["$defs"]["DeepSpeedConfig"]["properties"]["stage"]["maximum"] == 3


def test_make_job_helper_is_valid():
    assert make_job(training={"max_steps": 3}).training.max_steps == 3


def test_search_space_override_keeps_the_dotted_path(repo):
    from hone.config import load_job

    job = load_job(repo / "jobs" / "sweep-tiny.yaml", ["tune.search_space.training.lr={grid: [1.0e-4, 2.0e-4]}"])
    assert job.tune.search_space["training.lr"].candidates() == [1e-4, 2e-4]
