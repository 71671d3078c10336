"""``hone compare``: the shipped tiny comparison run once (every method hone has, on the tiny Llama) with a broken method
added, and the checks that need no run: the YAML's validation, few-shot prompts (seeded, never a held-out row)."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, check_full_weights, free_port, hone, private_home, reload_eval

TINY = REPO / "jobs" / "pipelines" / "compare-methods-tiny.yaml"
SHIPPED = sorted(p for p in (REPO / "jobs" / "pipelines").glob("compare-*.yaml"))


def _absolute(raw: dict, folder: Path) -> dict:
    """A comparison with its job paths made absolute (to be written elsewhere)."""
    raw["task"]["job"] = str((folder / raw["task"]["job"]).resolve())
    for m in raw["methods"]:
        if "job" in m:
            m["job"] = str((folder / m["job"]).resolve())
    return raw


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """The shipped tiny comparison plus a method whose model folder holds no model (it fails once its run loads it) and one
    that starts from it, in a private registry; the process's output, the result and the environment."""
    tmp = tmp_path_factory.mktemp("compare")
    (tmp / "no-model").mkdir()  # validates (the folder exists), fails once the run loads it
    job = yaml.safe_load((REPO / "jobs" / "tiny-smoke.yaml").read_text())
    job.update(name="broken", model={"name": str(tmp / "no-model")})
    (tmp / "broken.yaml").write_text(yaml.safe_dump(job))
    raw = _absolute(yaml.safe_load(TINY.read_text()), TINY.parent)
    raw["methods"] += [{"name": "broken", "job": str(tmp / "broken.yaml")},
                       {"name": "after-broken", "job": raw["methods"][2]["job"], "start_from": "broken"}]
    path = tmp / "compare.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))

    with pytest.MonkeyPatch.context() as mp:
        private_home(tmp, mp)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        storage = tmp / "runs"
        out = hone("compare", str(path), "--storage-path", str(storage), env=env, timeout=900)
        written = storage / "compare-methods-tiny-compare" / "compare.json"
        result = json.loads(written.read_text()) if written.exists() else None
        yield {"out": out, "result": result, "env": env, "storage": storage, "path": path, "tmp": tmp}


def _rows(compared) -> dict[str, dict]:
    assert compared["result"] is not None, compared["out"].stdout[-6000:] + compared["out"].stderr[-6000:]
    return {r["method"]: r for r in compared["result"]["rows"]}


@pytest.mark.slow
def test_every_method_is_scored_on_the_same_rows_with_the_same_scorer(compared):
    from hone.comparison.scoring import HeldOut
    from hone.config import load_compare

    out, rows = compared["out"], _rows(compared)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    ok = ["zero-shot", "few-shot-2", "lora", "full", "lora-dpo", "lora-grpo", "minilm"]
    assert [m for m, r in rows.items() if r["status"] == "ok"] == ok, {m: r.get("error") for m, r in rows.items()}
    # the rows every method was scored on, named by their digest: recomputed here from the task's job
    c = load_compare(compared["path"])
    digest = HeldOut.load(c.task, c.config.task).digest
    assert compared["result"]["rows_sha256"] == digest
    assert {r["rows_sha256"] for r in rows.values()} == {digest}
    assert compared["result"]["n_rows"] == 32 and "constrained choice among ['negative', 'positive']" in compared["result"]["scorer"]
    for m in ok:
        r = rows[m]
        assert 0.0 <= r["accuracy"] <= 1.0 and len(r["examples"]) == 4
        assert all(e["generated"] in ("negative", "positive") for e in r["examples"]), r["examples"]  # the constrained choice
        assert r["answer_ms"] > 0 and r["size_mb"] > 0 and (r.get("decode_ms_per_token") is None) == (m == "minilm"), r
    for m in ("lora", "full", "lora-dpo", "lora-grpo", "minilm"):
        r = rows[m]
        assert r["train_s"] > 0 and r["tokens_seen"] > 0 and r["peak_memory_mb_per_worker"] > 0 and r["eval_loss"] > 0, r
    assert 0 < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["lora-dpo"]["objective"] == "dpo" and rows["lora-grpo"]["objective"] == "grpo"
    # the classifier: its predicted label on its own view of the same reviews (no prompt, no decoding), every weight trained
    minilm = rows["minilm"]
    assert minilm["objective"] == "sequence_classification" and minilm.get("decode_ms_per_token") is None
    assert minilm["answer_ms"] > 0 and minilm["trainable_params"] > 20_000_000 and minilm["from"] == "builtin:minilm"
    assert "| minilm | " in out.stdout
    assert rows["few-shot-2"]["prompt_tokens_mean"] > rows["zero-shot"]["prompt_tokens_mean"]
    assert rows["few-shot-2"].get("eval_loss") is None and rows["zero-shot"]["eval_loss"] > 0
    folder = compared["storage"] / "compare-methods-tiny-compare"
    with open(folder / "compare.csv") as f:
        assert [r["method"] for r in csv.DictReader(f)] == [*ok, "broken", "after-broken"]
    assert (folder / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method | accuracy | eval loss | train wall" in out.stdout and "winner:" in out.stdout


@pytest.mark.slow
def test_the_classifier_s_full_zero2_export_reloads_with_its_labels(compared):
    """The comparison's MiniLM method is full fine-tuning of a sequence classifier under ZeRO-2 on 2 workers: its
    classification metrics, its history, and an export that plain transformers reloads with its labels, every weight
    trained and the training's metrics reproduced."""
    from transformers import AutoConfig

    from hone.artifacts import read_metrics
    from hone.config import JobConfig
    from hone.modeling import load_base_model

    minilm = _rows(compared)["minilm"]
    export, run_dir = Path(minilm["export"]), Path(minilm["run_dir"])
    info = json.loads((export / "hone.json").read_text())
    job = JobConfig.model_validate(info["job"])
    assert info["kind"] == "model" and info["zero_stage"] == 2 and info["num_workers"] == 2 and job.task.type == "sequence_classification"
    m = info["metrics"]
    for k in ("eval_accuracy", "eval_precision", "eval_recall", "eval_f1"):
        assert 0.0 <= m[k] <= 1.0, k
    reloaded = reload_eval(export, job)
    assert abs(reloaded["eval_loss"] - m["eval_loss"]) < 1e-4
    assert reloaded["eval_accuracy"] == pytest.approx(m["eval_accuracy"]) and reloaded["eval_f1"] == pytest.approx(m["eval_f1"])
    assert AutoConfig.from_pretrained(export).id2label == {0: "negative", 1: "positive"}
    check_full_weights(export, load_base_model(job))
    history = read_metrics(run_dir)
    assert [h["step"] for h in history] == [2, 4] and all("grad_norm" in h and "peak_memory_mb" in h for h in history)


@pytest.mark.slow
def test_a_failed_method_is_reported_and_the_others_finish(compared):
    rows = _rows(compared)
    assert rows["broken"]["status"] == "failed" and "tokenizer" in rows["broken"]["error"], rows["broken"]  # no model there
    assert rows["after-broken"]["status"] == "skipped" and "broken, which failed" in rows["after-broken"]["error"]
    assert "| broken | **failed**: " in compared["out"].stdout
    # the methods after it ran (the comparison's order): the failure stopped nothing
    order = [r["method"] for r in compared["result"]["rows"]]
    assert order.index("broken") == 7 and rows["lora-grpo"]["status"] == "ok"


@pytest.mark.slow
def test_trained_models_are_registered_with_their_lineage_and_the_winner_serves(compared):
    from hone import registry

    rows, result = _rows(compared), compared["result"]
    lora = registry.resolve_model_ref(rows["lora"]["model"])
    assert lora["tags"]["hone.compare"] == "compare-methods-tiny" and lora["tags"]["hone.from"] == "builtin:tiny-llama"
    for m in ("lora-dpo", "lora-grpo"):  # trained from the LoRA method's registered model
        tags = registry.resolve_model_ref(rows[m]["model"])["tags"]
        assert tags["hone.method"] == m and tags["hone.from"] == rows["lora"]["model"] == rows[m]["from"]
    ok = [r for r in rows.values() if r["status"] == "ok"]
    best = max(r["accuracy"] for r in ok)
    assert result["winner"]["accuracy"] == best and rows[result["winner"]["method"]]["accuracy"] == best
    if rows[result["winner"]["method"]]["kind"] == "trained":
        winner = registry.resolve_model_ref("models:/compare-methods-tiny@winner")
        assert winner["source"] == rows[result["winner"]["method"]]["export"]
        assert winner["tags"]["hone.rows_sha256"] == result["rows_sha256"]

    # A registered model of the comparison goes through hone pipeline as it is: no training, served, smoke-tested.
    pipeline = compared["tmp"] / "serve-winner.yaml"
    pipeline.write_text(yaml.safe_dump({
        "kind": "pipeline", "name": "serve-compared",
        "train": {"job": str(REPO / "jobs" / "tiny-smoke.yaml"), "model": "models:/compare-methods-tiny-full@winner"},
        "serve": {"port": free_port(), "metrics_export_port": free_port(), "ray_actor_options": {"num_cpus": 0.5},
                  "redact_logs": True},  # the ingress and replica mask what they log; the smoke examples are masked
        "smoke_test": {"requests": 8, "concurrency": 4, "max_tokens": 4, "compare_untuned": False},
    }))
    started = time.time()
    out = hone("pipeline", str(pipeline), "--storage-path", str(compared["storage"]), env=compared["env"], timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-6000:]
    summary = json.loads((compared["storage"] / "serve-compared-pipeline" / "summary.json").read_text())
    assert summary["stages"]["train"]["model"] == rows["full"]["model"] and summary["stages"]["train"]["given"]
    assert summary["stages"]["serve"]["model"] == rows["full"]["model"]
    assert summary["stages"]["smoke_test"]["ok"] == 8 and len(summary["stages"]["smoke_test"]["examples"]) == 3
    assert "took models:/compare-methods-tiny-full@winner" in out.stdout and time.time() - started < 600


# --------------------------------------------------------------------------- no run needed


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_comparisons_validate_and_open_with_their_command(path):
    from hone.config import load_compare

    c = load_compare(path)
    assert c.config.name == path.stem
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("hone compare" in line and path.name in line for line in header), f"{path.name} must open with its command"


def test_a_bad_comparison_is_refused_with_every_problem_before_any_work(tmp_path):
    other = yaml.safe_load((REPO / "jobs" / "tiny-smoke.yaml").read_text())
    other["data"]["seed"] = 7  # another seeded order: its training rows can be the task's held-out rows
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    bad = _absolute({"kind": "compare", "task": {"job": "../tiny-smoke.yaml"}, "methods": [
        {"name": "a", "shots": 0},
        {"name": "a", "shots": 2},
        {"name": "both", "shots": 1, "job": "../tiny-smoke.yaml"},
        {"name": "b", "job": "../dpo-tiny.yaml", "start_from": "later"},
        {"name": "later", "job": "../tiny-smoke.yaml"},
        {"name": "leaky", "job": str(tmp_path / "other.yaml")},
        {"name": "cls", "job": "../classify-minilm-sentiment.yaml", "start_from": "later"},
        {"name": "from-cls", "job": "../grpo-tiny.yaml", "start_from": "cls"},
    ]}, REPO / "jobs" / "pipelines")
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = hone("validate", str(path), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "methods.2" in out.stderr and "give shots (prompting) or job (training)" in out.stderr, out.stderr
    bad["methods"].pop(2)
    path.write_text(yaml.safe_dump(bad))
    out = hone("compare", str(path), "--storage-path", str(tmp_path / "runs"), timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    for text in ("methods[1].name", "names two methods", "methods[2].start_from", "'later' is not an earlier training method",
                 "methods[4].job", "could be the held-out rows", "methods[5].start_from", "a classifier starts from its encoder",
                 "methods[6].start_from", "'cls' trains a sequence_classification model, which does not generate"):
        assert text in out.stderr, (text, out.stderr)
    assert not (tmp_path / "runs").exists()


def test_few_shot_examples_are_seeded_and_never_a_held_out_row(tmp_path):
    """The examples come from the training split, the same for the same seed, and skip a training row whose prompt is
    also held out (the source repeats it), even when that leaves exactly enough rows."""
    from transformers import AutoTokenizer

    from hone import assets
    from hone.comparison.scoring import HeldOut, few_shot_examples, few_shot_prompt
    from hone.config import validate_job
    from hone.config.compare import ScoringConfig

    def row(i: int, label: str) -> str:
        return json.dumps({"instruction": "Classify.", "input": f"review {i}", "output": label}) + "\n"

    (tmp_path / "train.jsonl").write_text("".join(row(i, ("negative", "positive")[i % 2]) for i in range(10)))
    (tmp_path / "test.jsonl").write_text(row(3, "positive") + row(100, "negative"))  # review 3 is in both
    job = validate_job({"name": "fs", "model": {"name": "builtin:tiny-llama"},
                        "data": {"source": str(tmp_path / "train.jsonl"), "format": "alpaca", "prompt_template": "chat",
                                 "test": str(tmp_path / "test.jsonl"), "validation": None}})
    held = HeldOut.load(job, ScoringConfig(job="x.yaml", rows=2))
    assert len(held.rows) == 2 and held.labels == ["negative", "positive"]
    first = few_shot_examples(job, held, 3, seed=0)
    assert first == few_shot_examples(job, held, 3, seed=0) and first != few_shot_examples(job, held, 3, seed=1)
    for seed in range(3):  # the labels take turns: two of each in four shots, whatever the seed
        assert sorted(r["output"] for r in few_shot_examples(job, held, 4, seed=seed)) == ["negative"] * 2 + ["positive"] * 2
    every = few_shot_examples(job, held, 9, seed=0)  # all ten training rows but the one held out
    assert sorted(r["input"] for r in every) == sorted(f"review {i}" for i in range(10) if i != 3)
    with pytest.raises(ValueError, match="only 9 rows that are not held out"):
        few_shot_examples(job, held, 10, seed=0)

    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model("builtin:tiny-llama"))
    prompt = few_shot_prompt(held.rows[1], first, job, tokenizer)
    for ex in first:  # each example's review and answer, in order, then the held-out review last
        assert f"{ex['input']}" in prompt and prompt.count(ex["output"]) >= 1
    assert prompt.rindex("review 100") > max(prompt.index(ex["input"]) for ex in first)
    assert prompt.endswith(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                                         add_generation_prompt=True).split("x")[-1])


def test_a_classifier_is_scored_only_on_the_task_s_own_rows():
    """A classifier reads its own view of the rows (the review text and its label): row i must be the task's row i, or
    its score would be on other rows."""
    from hone.comparison.scoring import HeldOut, classifier_rows
    from hone.config import load_job
    from hone.config.compare import ScoringConfig

    task = load_job(REPO / "jobs" / "tiny-smoke.yaml")
    classifier = load_job(REPO / "jobs" / "classify-minilm-sentiment.yaml")
    held = HeldOut.load(task, ScoringConfig(job="x.yaml", split="test", rows=16))
    rows, answers = classifier_rows(classifier, held, "test")
    assert len(rows) == 16 and answers == [r["output"] for r in held.rows]
    assert all(r["text"] == t["input"] for r, t in zip(rows, held.rows))
    other = HeldOut.load(task, ScoringConfig(job="x.yaml", split="validation", rows=16))  # the task scored on other rows
    with pytest.raises(ValueError, match="is not the task's row 0"):
        classifier_rows(classifier, other, "test")
