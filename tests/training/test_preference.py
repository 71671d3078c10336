"""Preference fine-tuning (DPO, IPO, SimPO, ORPO, KTO) through the same Ray Train + DeepSpeed path as supervised
fine-tuning: real workers on the test cluster, exports reloaded with plain transformers/PEFT, exact resume, a sweep
that registers its winner by reward accuracy, and bad configs and rows refused before any Ray work.

The losses themselves are checked against TRL in ``test_preference_parity.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hone.config import JobConfigError, validate_job
from hone.data import DataError, load_tokenizer, prepare_data, preview
from hone.training import WorkerContext, objective_class, train

from tests.helpers import hone, killed_after_step, losses, read_metrics

# The shipped tiny recipe, shortened: 3 steps, each logged, evaluated at the end.
PAIRS = yaml.safe_load((Path(__file__).resolve().parents[2] / "jobs" / "dpo-tiny.yaml").read_text())
PAIRS["data"].update(max_samples=128, max_eval_samples=24)
PAIRS["training"].update(lr=3e-3, max_steps=3, log_every=1, eval_every=None)


def pref_job(name: str, **sections) -> dict:
    raw = json.loads(json.dumps(PAIRS))
    raw["name"] = name
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "method" else value
    return raw


def reload_metrics(export: Path, job) -> dict[str, float]:
    """The export loaded with plain transformers/PEFT, outside Ray, scored on the validation pairs by hone's objective."""
    import peft
    from transformers import AutoModelForCausalLM

    from hone.modeling import load_base_model

    tokenizer = load_tokenizer(job)
    rows = list(prepare_data(job, tokenizer).validation)
    info = json.loads((export / "hone.json").read_text())
    model = peft.PeftModel.from_pretrained(load_base_model(job), str(export)) if info["kind"] == "adapter" \
        else AutoModelForCausalLM.from_pretrained(export)
    engine = SimpleNamespace(module=model, hf_module=model, device=torch.device("cpu"))
    one_process = validate_job({**job.to_dict(), "distributed": {"num_workers": 1, "deepspeed": None}})  # a plain frozen reference
    ctx = WorkerContext(one_process, engine, tokenizer.pad_token_id, rank=0, world_size=1, all_reduce=lambda x: x)
    return objective_class(one_process)(ctx).evaluate(rows, 4, 0)


# --------------------------------------------------------------------------- every objective on Ray Train


def history_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(cluster, connected, slow_reports, tmp_path_factory):
    """Each objective's run, trained once for the module (the ZeRO-3 test starts from the DPO run's adapter).

    The IPO run goes through ``hone train`` and is interrupted: 4 steps with checkpoints at 2 and 4, SIGKILLed once step
    3 is logged, then resumed with ``hone train --resume``; every step it computes again must reproduce its loss."""
    done = {}

    def run(loss: str):
        if loss in done:
            return done[loss]
        sections = {"preference": {"loss": loss}}
        if loss == "kto":
            sections["data"] = {**PAIRS["data"], "format": "unpaired"}
        if loss != "ipo":
            job = validate_job(pref_job(f"pref-{loss}", **sections))
            done[loss] = (job, train(job, storage_path=str(connected), quiet=True))
            return done[loss]
        raw = pref_job("pref-ipo", **sections, training={**PAIRS["training"], "max_steps": 4, "checkpoint_every": 2})
        path = tmp_path_factory.mktemp("ipo") / "ipo.yaml"
        path.write_text(yaml.safe_dump(raw))
        run_dir = killed_after_step(3, cluster["address"], path, path.parent / "runs", slow_reports)
        before = losses(run_dir)
        out = hone("train", "--resume", str(run_dir), "--address", cluster["address"], env=slow_reports, check=True)
        meta = json.loads((run_dir / "hone-run.json").read_text())
        result = SimpleNamespace(run_dir=run_dir, export_dir=run_dir / "export", metrics=meta["metrics"], before=before, out=out.stdout)
        done[loss] = (validate_job(raw), result)
        return done[loss]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo", "kto"])
def test_each_objective_trains_on_two_zero2_workers_and_its_export_reloads(runs, loss):
    job, result = runs(loss)
    assert result.export_dir is not None and result.metrics["done"]
    history = read_metrics(result.run_dir)  # (a step computed again after a resume keeps its last record)
    assert [m["step"] for m in history] == list(range(1, job.training.max_steps + 1))
    for m in history:
        for key in ("loss", "rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
            assert math.isfinite(m[key]), (key, m)
        assert 0.0 <= m["reward_accuracy"] <= 1.0
    if loss == "kto":
        assert all(m["kl"] >= 0 for m in history)
    final = history[-1]
    assert {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"} <= set(final)
    # the sweep/early-stopping metric: the best of the run's evaluations (at its checkpoints and at the end)
    assert final["best_eval_reward_accuracy"] == max(m["eval_reward_accuracy"] for m in history if "eval_reward_accuracy" in m)
    info = json.loads((result.export_dir / "hone.json").read_text())
    assert info["objective"] == loss and info["kind"] == "adapter"
    reloaded = reload_metrics(result.export_dir, job)
    for key in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_rewards_chosen"):
        assert abs(reloaded[key] - final[key]) < 1e-4, (key, reloaded[key], final[key])
    if loss in ("dpo", "ipo", "kto"):
        # the reference is the base (adapter disabled): a trained adapter moves the policy away from it
        assert abs(final["eval_rewards_chosen"]) > 0
    if loss == "dpo":  # LoRA starts as the identity, so at step 1 the policy is its reference: every pair's loss is log 2
        assert abs(history[0]["loss"] - math.log(2)) < 1e-6 and history[0]["reward_margin"] == 0.0


@pytest.mark.slow
def test_an_interrupted_run_resumes_with_identical_losses(runs):
    """The IPO run, killed after step 3 with a checkpoint at 2 (the next at 4): the resume starts at the latest intact
    checkpoint and recomputes the steps after it, each with the loss logged for it before the kill."""
    _, result = runs("ipo")
    resumed_at = int(result.out.split("resumed at step ", 1)[1].split("/", 1)[0])
    assert resumed_at == 2, result.out[-3000:]
    after = losses(result.run_dir)
    assert sorted(after) == [1, 2, 3, 4] and max(result.before) == 3
    assert len(after[3]) == 2 and abs(after[3][1] - after[3][0]) < 1e-6, after[3]  # step 3, computed again


@pytest.mark.slow
def test_zero3_adapters_starting_from_a_registered_adapter(runs, connected, home, capsys):
    """ZeRO-3 with a new LoRA adapter on ``models:/pref-dpo@winner`` (an adapter export): the run starts from that
    adapter merged into its base, which is also the reference (the new adapter disabled): step 1's loss is log 2."""
    from hone import registry
    from hone.modeling import load_base_model

    start_job, start = runs("dpo")
    registry.register_winner("pref-dpo", start.mlflow_run_id, start.export_dir, "eval_reward_accuracy",
                             start.metrics["eval_reward_accuracy"])
    job = validate_job(pref_job("pref-z3-lora", model={"name": "models:/pref-dpo@winner"},
                                distributed={"num_workers": 2, "deepspeed": {"stage": 3}}), check_paths=False)
    result = train(job, storage_path=str(connected), quiet=True)
    assert "starting from models:/pref-dpo@winner" in capsys.readouterr().out
    started = yaml.safe_load((result.run_dir / "job.yaml").read_text())["model"]["name"]
    assert Path(started).is_dir() and "merged" in started  # the adapter merged once into the cache
    merged = load_base_model(validate_job({**job.to_dict(), "model": {"name": started}}, check_paths=False))
    base = load_base_model(start_job)
    assert any(not torch.equal(a, b) for a, b in zip(merged.parameters(), base.parameters()))  # the trained weights
    history = history_of(result.run_dir)
    assert abs(history[0]["loss"] - math.log(2)) < 1e-6
    final = result.metrics
    assert final["done"] and abs(final["eval_rewards_chosen"]) > 0
    reloaded = reload_metrics(result.export_dir, validate_job({**job.to_dict(), "model": {"name": started}}, check_paths=False))
    assert abs(reloaded["eval_reward_accuracy"] - final["eval_reward_accuracy"]) < 1e-4
    assert abs(reloaded["eval_loss"] - final["eval_loss"]) < 1e-4, (reloaded, final)


@pytest.mark.slow
def test_zero3_full_fine_tuning_with_a_sharded_frozen_reference(connected):
    job = validate_job(pref_job("pref-z3-full", method="full", distributed={"num_workers": 2, "deepspeed": {"stage": 3}},
                                training={**PAIRS["training"], "lr": 1e-4}))
    result = train(job, storage_path=str(connected), quiet=True)
    final = result.metrics
    assert final["done"] and math.isfinite(final["eval_loss"])
    assert abs(history_of(result.run_dir)[0]["loss"] - math.log(2)) < 1e-6  # the frozen copy equals the start
    assert abs(final["eval_rewards_chosen"]) > 0  # the policy moved away from its reference
    reloaded = reload_metrics(result.export_dir, job)
    assert abs(reloaded["eval_reward_accuracy"] - final["eval_reward_accuracy"]) < 1e-4
    assert abs(reloaded["eval_loss"] - final["eval_loss"]) < 1e-4, (reloaded, final)


# --------------------------------------------------------------------------- a sweep by reward accuracy


@pytest.mark.slow
def test_a_dpo_sweep_registers_its_winner_by_reward_accuracy(connected, cluster, home):
    from hone import registry
    from hone.tune import sweep

    raw = pref_job("dpo-sweep", training={**PAIRS["training"], "max_steps": 2},
                   tune={"search_space": {"preference.beta": {"grid": [0.05, 0.5]}}, "num_samples": 1,
                         "metric": "eval_reward_accuracy", "scheduler": "fifo"})
    result = sweep(validate_job(raw), address=cluster["address"], storage_path=str(connected))  # the module's data cache
    assert len(result.trials) == 2 and all(t["status"] == "completed" for t in result.trials)
    best = max(result.trials, key=lambda t: t["eval_reward_accuracy"])
    assert result.winner["eval_reward_accuracy"] == best["eval_reward_accuracy"]
    version = registry.resolve_model_ref("models:/dpo-sweep@winner")
    assert version["tags"]["hone.metric"] == "eval_reward_accuracy"
    assert float(version["tags"]["hone.metric_value"]) == pytest.approx(best["eval_reward_accuracy"])


# --------------------------------------------------------------------------- data


def test_pairs_mask_the_prompt_and_cut_the_prompt_first(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "Is this review positive? " + "word " * 80}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no, not at all"}]},
        {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 8))
    job = validate_job(pref_job("pairs", data={"source": str(path), "format": "preference", "max_length": 48, "validation": None,
                                               "max_samples": None, "max_eval_samples": None}))
    tokenizer = load_tokenizer(job)
    prepared = prepare_data(job, tokenizer)
    report = prepared.report.splits["train"]
    assert report.rows_out == 16 and report.truncated == 8  # the long chat prompts
    for row in prepared.train:
        for ids, labels in ((row["input_ids"], row["labels"]), (row["rejected_ids"], row["rejected_labels"])):
            assert len(ids) <= 48 and len(ids) == len(labels)
            trained = [i for i, label in zip(ids, labels) if label != -100]
            assert trained and ids[len(ids) - len(trained):] == trained  # only the response, at the end
        answer = tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"]) if label != -100])
        assert answer.startswith(("yes", "hi")), answer  # the response survives whole: the prompt was cut first
    long = next(r for r in prepared.train if len(r["rejected_ids"]) == 48)  # the longest response decides the prompt's cut
    assert "<|im_start|>assistant" in tokenizer.decode(long["input_ids"])  # the chat template rendered the messages
    prompts = [[i for i, label in zip(ids, labels) if label == -100]
               for ids, labels in ((long["input_ids"], long["labels"]), (long["rejected_ids"], long["rejected_labels"]))]
    assert prompts[0] == prompts[1]  # one prompt for both, cut (from its start) to make room for the longer response
    text = preview(job, n=2)
    assert "chosen:" in text and "rejected:" in text and "⟦" in text


def test_the_builtin_reviews_have_a_preference_and_an_unpaired_view():
    from hone import assets

    pairs = assets.load_builtin_dataset("builtin:rotten-tomatoes", "preference")["validation"]
    row = pairs[0]
    assert {row["chosen"], row["rejected"]} == {"positive", "negative"} and assets.SENTIMENT_INSTRUCTION in row["prompt"]
    unpaired = assets.load_builtin_dataset("builtin:rotten-tomatoes", "unpaired")["validation"]
    assert len(unpaired) == 2 * len(pairs) and unpaired[0]["label"] is True and unpaired[1]["label"] is False
    assert unpaired[0]["completion"] == row["chosen"]


# --------------------------------------------------------------------------- refused before any Ray work


@pytest.mark.parametrize("change, where", [
    ({"preference": {"loss": "kto"}}, "data.format"),
    ({"preference": None}, "data.format"),
    ({"preference": {"loss": "ipo", "label_smoothing": 0.1}}, "preference"),
    ({"preference": {"loss": "dpo", "beta": 0}}, "preference.beta"),
    ({"preference": {"loss": "dpo", "max_prompt_length": 96}}, "preference.max_prompt_length"),
    ({"training": {**PAIRS["training"], "eval_metric": "eval_accuracy"}}, "training.eval_metric"),
    ({"data": {**PAIRS["data"], "packing": True}}, "data.packing"),
    ({"task": {"type": "sequence_classification", "num_labels": 2}}, "preference"),
])
def test_bad_preference_configs_are_refused(change, where):
    with pytest.raises(JobConfigError) as e:
        validate_job(pref_job("bad", **change))
    assert any(p.path.startswith(where) for p in e.value.problems), e.value.problems


def test_kto_needs_two_completions_per_micro_batch():
    raw = pref_job("kto", preference={"loss": "kto"}, data={**PAIRS["data"], "format": "unpaired"},
                   training={**PAIRS["training"], "batch_size": 1})
    with pytest.raises(JobConfigError, match="KL"):
        validate_job(raw)


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"prompt": "a", "chosen": "b"}], "preference", "data.columns.rejected"),
    ([{"prompt": "a", "chosen": "same", "rejected": "same "}], "preference", "identical"),
    ([{"prompt": "a", "completion": "b"}], "unpaired", "data.columns.label"),
    ([{"prompt": "a", "completion": "b", "label": "maybe"}], "unpaired", "boolean label"),
])
def test_bad_rows_are_refused_before_any_ray_work(tmp_path, rows, fmt, message):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 4))
    loss = "kto" if fmt == "unpaired" else "dpo"
    job = validate_job(pref_job("rows", preference={"loss": loss}, data={"source": str(path), "format": fmt}))
    with pytest.raises(DataError, match=message):
        train(job, address="127.0.0.1:1", storage_path=str(tmp_path / "runs"))  # nothing listens there: refused first
