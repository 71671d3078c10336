"""Online RL (GRPO) with rollouts on vLLM actors: one run of the tiny recipe on the test cluster, hit by two faults (its
driver SIGKILLed, then, after the resume, its rollout engine killed), checked for the rewards, KL, time split and sync
check of every step, the exact resume of the reward curve and the engine's replacement; the weight-sync proof on a real
rollout engine; rewards, advantages and the loss; and bad configs refused before any Ray work."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hone.config import JobConfigError, validate_job
from hone.data import DataError, load_tokenizer, prepare_data
from hone.training import train

from tests.helpers import REPO, killed_after_step, records, start_hone, stop_group, wait_until

RECIPE = yaml.safe_load((REPO / "jobs" / "grpo-tiny.yaml").read_text())


def grpo_job(name: str, **overrides) -> dict:
    raw = json.loads(json.dumps(RECIPE))
    raw["name"] = name
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


# --------------------------------------------------------------------------- the loop on Ray Train


def _rollout_engines(address: str) -> list:
    from ray.util.state import list_actors

    # the cluster's address, never found by looking: another Ray may run on this machine (the serving tests' lane)
    return list(list_actors(address=address, filters=[("class_name", "=", "RolloutEngine"), ("state", "=", "ALIVE")]))


@pytest.fixture(scope="module")
def tiny_run(cluster, slow_reports, connected, tmp_path_factory):
    """The tiny recipe for 6 steps (evaluated before training and every 2 steps, checkpoints every 2) through ``hone train``:
    two optimiser updates per step's rollouts (``num_iterations``), SIGKILLed after step 3, resumed with ``hone train
    --resume``, and its rollout engine killed once the resumed run has logged step 4.
    Returns the run's folder, its records before the resume, and the resume's output."""
    import ray

    tmp = tmp_path_factory.mktemp("grpo")
    job = tmp / "grpo-run.yaml"
    job.write_text(yaml.safe_dump(grpo_job("grpo-run", training={"max_steps": 6, "eval_every": 2, "eval_on_start": True,
                                                                 "checkpoint_every": 2},
                                           # tied groups left out of the loss; two updates per batch of rollouts
                                           grpo={"dynamic_sampling": True, "num_iterations": 2})))
    # each report waits for the controller's 1 s poll: the kill after step 3 lands long before step 4's checkpoint (a
    # GRPO step of the tiny model takes a fraction of a second)
    env = {**slow_reports, "HONE_RAY_LOG_LEVEL": "ERROR"}
    run_dir = killed_after_step(3, cluster["address"], job, tmp / "runs", env)
    before = records(run_dir)
    stale = {a.actor_id for a in _rollout_engines(cluster["address"])}  # the killed run's, if Ray has not ended them yet
    log = tmp / "resume.log"
    proc = start_hone("train", "--resume", str(run_dir), "--address", cluster["address"], env=env, log=log)
    killed = []
    try:
        # the resumed run's engines are looked up while it trains (the state API can take seconds on a busy machine), so
        # that once step 4 is logged the kill is one call, long before steps 5 and 6 have used the engines
        wait_until(lambda: records(run_dir)[len(before):], "the resumed run's first step", proc=proc, log=log)
        engines = wait_until(lambda: [a for a in _rollout_engines(cluster["address"]) if a.actor_id not in stale],
                             "the resumed run's rollout engines", proc=proc, log=log)
        handles = {a.name: ray.get_actor(a.name, namespace=a.ray_namespace) for a in engines}
        wait_until(lambda: any(m["step"] >= 4 for m in records(run_dir)[len(before):]), "step 4 of the resumed run", proc=proc, log=log)
        for name, handle in handles.items():
            ray.kill(handle, no_restart=True)
            killed.append(name)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        stop_group(proc)
    return {"job": validate_job(yaml.safe_load(job.read_text())), "run_dir": run_dir, "before": before, "log": log.read_text(),
            "killed": killed}


@pytest.mark.slow
def test_the_tiny_recipe_logs_rewards_kl_and_the_time_split_every_step(tiny_run):
    job, run_dir = tiny_run["job"], tiny_run["run_dir"]
    history = records(run_dir)
    final = {m["step"]: m for m in history}  # a step logged again after the resume keeps its last record
    assert sorted(final) == [1, 2, 3, 4, 5, 6]
    for m in history:
        for key in ("reward", "reward_std", "reward_choice", "reward_concise", "completion_length", "rollout_tokens_per_s",
                    "rollout_time_s", "train_time_s", "sync_time_s", "clip_ratio", "frac_reward_zero_std", "idle_steps",
                    "truncated_ratio", "frac_groups_dropped"):
            assert math.isfinite(m[key]), (key, m)
        assert m["rollout_tokens_per_s"] > 0 and m["rollout_time_s"] > 0
        assert 0 < m["completion_length"] <= job.grpo.max_new_tokens
        assert m["reward"] == pytest.approx(m["reward_choice"] + 0.5 * m["reward_concise"], abs=1e-9)
        assert m["reward_errors"] == 0
        assert 0 <= m["frac_groups_dropped"] <= m["frac_reward_zero_std"] and 0 <= m["truncated_ratio"] <= 1
        if m["idle_steps"]:  # every group tied: no update, nothing to sync, the gradient norm 0
            assert m["frac_reward_zero_std"] == 1.0 and m["grad_norm"] == 0.0, m
            continue
        # every step that learned had its sync checked (after the resume and on the replacement engine too): the
        # engine now computes the trainer's log-probs, and they moved
        assert m["sync_time_s"] > 0 and m["sync_logprob_diff"] < 2e-3, m
        assert m["sync_logprob_change"] > 1e-4, m
        assert m["engine_logprob_gap"] < 1e-3 and math.isfinite(m["kl"])  # the sampled tokens' log-probs: engine and trainer agree
    assert final[1]["kl"] < final[6]["kl"]  # the policy leaves the reference (beta 0.04)
    assert "initial_eval_reward" in final[1] and all("eval_reward" in final[s] for s in (2, 4, 6))
    info = json.loads((run_dir / "export" / "hone.json").read_text())
    assert info["objective"] == "grpo" and info["kind"] == "adapter"
    metrics = json.loads((run_dir / "hone-run.json").read_text())["metrics"]
    assert metrics["best_eval_reward"] == max(m["eval_reward"] for m in final.values() if "eval_reward" in m)


@pytest.mark.slow
def test_resume_continues_the_reward_curve(tiny_run):
    """SIGKILLed after step 3 (checkpoints every 2): the resumed run restarts at step 2, samples the same completions
    for step 3 (seeded per prompt, engines synced to the checkpoint's weights) and logs the same rewards."""
    assert "resumed at step 2/6" in tiny_run["log"], tiny_run["log"][-3000:]
    before = {m["step"]: m for m in tiny_run["before"]}
    after = {m["step"]: m for m in records(tiny_run["run_dir"])[len(tiny_run["before"]):]}
    assert max(before) == 3 and min(after) == 3
    for key in ("reward", "reward_choice", "reward_concise", "completion_length"):
        assert after[3][key] == pytest.approx(before[3][key], abs=1e-9), key
    assert after[3]["loss"] == pytest.approx(before[3]["loss"], abs=1e-6)


@pytest.mark.slow
def test_a_killed_rollout_engine_is_replaced_and_training_continues(tiny_run):
    """The rollout engine killed (``ray.kill``) after the resumed run's step 4: the pool replaces it, the new engine gets
    the trained weights (the sync check holds), the run finishes every step and exports."""
    assert tiny_run["killed"], "no rollout engine was found to kill"
    after = records(tiny_run["run_dir"])[len(tiny_run["before"]):]
    assert [m["step"] for m in after] == [3, 4, 5, 6]
    assert sum(m.get("rollout_engines_replaced", 0) for m in after if m["step"] > 4) >= 1
    assert all(m["sync_logprob_diff"] < 2e-3 for m in after if not m["idle_steps"])
    assert (tiny_run["run_dir"] / "export" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_a_reward_past_its_timeout_is_cancelled_not_left_running(cluster, connected, tmp_path):
    """A hung function reward marks its samples and its task is ended: hung tasks do not pile up, one per step. On a busy
    cluster the task may be cancelled before a worker ever ran it (no pid to watch): Ray's record of it must then say
    cancelled; when it did start, its process must end."""
    import ray
    from ray.util.state import list_tasks

    from hone.training.rewards import score

    job = validate_job(grpo_job("hang", grpo={"reward_timeout_s": 2, "rewards": [
        {"type": "exact_match"}, {"type": "function", "function": "tests.training.grpo_rewards:hang"}]}))
    pidfile = tmp_path / "reward.pid"
    table = score(job, ["p"], ["a"], [{"answer": "a", "pidfile": str(pidfile)}])
    assert table[0][0] == 1.0 and math.isnan(table[0][1])  # the hung term is marked, the other scored
    job_id = ray.get_runtime_context().get_job_id()

    def ended() -> bool:
        tasks = [t for t in list_tasks(address=cluster["address"], filters=[("job_id", "=", job_id),
                                                                           ("func_or_class_name", "=", "call_reward_function")])
                 if t.state != "FINISHED"]  # the module's other reward calls returned
        cancelled = [t for t in tasks if t.state == "FAILED"]
        if pidfile.exists():  # it started: its process must be gone
            return bool(cancelled) and not _alive(int(pidfile.read_text()))
        return bool(cancelled)

    wait_until(ended, "the timed-out reward task to be cancelled and its process ended", timeout=120)
    assert not pidfile.exists() or not _alive(int(pidfile.read_text()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_a_weight_sync_reaches_the_engine_and_is_what_the_trainer_computes(connected):
    """The proof the issue asks for, on a real vLLM engine: after a sync (an adapter, then full weights) the engine's
    log-probs of a fixed prompt equal the trainer's to 1e-4, and differ from before the sync."""
    import peft
    import ray

    from hone import assets
    from hone.modeling import load_base_model
    from hone.training.grpo import engine_weights
    from hone.training.rollout import start_pool, stop_pool

    job = validate_job(grpo_job("grpo-sync"))
    tokenizer = load_tokenizer(job)
    ids = tokenizer("a quietly moving film about two brothers and the sea")["input_ids"]

    def logps(model) -> list[float]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        return torch.gather(logits.log_softmax(-1), 1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1).tolist()

    def gap(a, b) -> float:
        return max(abs(x - y) for x, y in zip(a, b))

    base = load_base_model(job).eval()
    pool = start_pool(job, assets.resolve_model(job.model.name), "hone-rollout-sync-test")
    try:
        before = ray.get(pool.check.remote(ids))[0]
        assert gap(before, logps(base)) < 1e-4
        torch.manual_seed(0)
        adapted = peft.get_peft_model(load_base_model(job), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.2)
        adapted.eval()
        lora_job = validate_job({**job.to_dict(), "method": {"type": "lora", "lora": {"r": 8, "alpha": 16}}})
        weights = engine_weights(SimpleNamespace(full_state_dict=adapted.state_dict, hf_module=adapted), lora_job)
        assert set(weights["lora"]) == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
        ray.get(pool.sync.remote([ray.put(weights)], 1))
        after = ray.get(pool.check.remote(ids))[0]
        assert gap(after, logps(adapted)) < 1e-4
        assert gap(after, before) > 1e-3
        # full weights: every parameter moved
        full = load_base_model(job).eval()
        with torch.no_grad():
            for p in full.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        full_job = validate_job({**job.to_dict(), "method": {"type": "full"}})
        ray.get(pool.sync.remote([ray.put(engine_weights(SimpleNamespace(full_state_dict=full.state_dict, hf_module=full), full_job))], 2))
        final = ray.get(pool.check.remote(ids))[0]
        assert gap(final, logps(full)) < 1e-4
        assert gap(final, after) > 1e-3
        assert ray.get(pool.info.remote())["version"] == 2
    finally:
        stop_pool(pool)


# --------------------------------------------------------------------------- refused before any Ray work


def test_validating_a_function_reward_runs_none_of_its_module(tmp_path, monkeypatch):
    """The reward module is found and read, not imported: its top-level code runs only where rewards are scored."""
    pkg = tmp_path / "team_rewards"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"open({str(tmp_path / 'package-ran')!r}, 'w').close()\n")
    (pkg / "scores.py").write_text(f"open({str(tmp_path / 'module-ran')!r}, 'w').close()\n\n"
                                   "def brevity(prompts, completions, rows):\n    return [-len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    validate_job(grpo_job("g", grpo={"rewards": [{"type": "function", "function": "team_rewards.scores:brevity"}]}))
    with pytest.raises(JobConfigError, match="has no function 'length'"):
        validate_job(grpo_job("g", grpo={"rewards": [{"type": "function", "function": "team_rewards.scores:length"}]}))
    assert not (tmp_path / "package-ran").exists() and not (tmp_path / "module-ran").exists()


def test_rollout_engines_load_the_trainer_s_revision_of_a_hub_model(monkeypatch, tmp_path):
    import huggingface_hub

    from hone.training.grpo import rollout_model_dir

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or str(tmp_path))
    job = validate_job(grpo_job("g", model={"name": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "abc123"}))
    assert rollout_model_dir(job) == str(tmp_path) and asked == [("HuggingFaceTB/SmolLM2-135M-Instruct", {"revision": "abc123"})]
    assert rollout_model_dir(validate_job(grpo_job("g"))) != str(tmp_path)  # a built-in: its local folder, nothing fetched


def test_bad_grpo_configs_are_refused_at_validation():
    cases = [
        (grpo_job("g", grpo={"k": 1}), "grpo.k"),
        (grpo_job("g", grpo={"rewards": [{"type": "function", "function": "no_such_package.rewards:score"}]}), "no_such_package"),
        (grpo_job("g", grpo={"rewards": [{"type": "function", "function": "json:no_such_function"}]}), "no function 'no_such_function'"),
        (grpo_job("g", grpo={"rewards": [{"type": "function", "function": "not a path"}]}), "module.path:name"),
        (grpo_job("g", grpo={"rewards": [{"type": "choice"}]}), "needs `labels`"),
        (grpo_job("g", grpo={"rewards": [{"type": "regex", "pattern": "("}]}), "not a regular expression"),
        (grpo_job("g", grpo={"rewards": [{"type": "exact_match", "weight": 0}]}), "every weight is 0"),
        (grpo_job("g", grpo={"structured_outputs": {"lark": "x"}}), "structured_outputs"),
        (grpo_job("g", data={"format": "alpaca"}), "data.format"),
        (grpo_job("g", grpo=None), "grpo: section"),
        (grpo_job("g", training={"eval_metric": "eval_accuracy"}), "training.eval_metric"),
        (grpo_job("g", grpo={"max_new_tokens": 200}), "grpo.max_new_tokens"),
        (grpo_job("g", method={"type": "ia3"}), "method.type"),
    ]
    for raw, needle in cases:
        with pytest.raises((JobConfigError, ValueError)) as e:
            validate_job(raw)
        assert needle in str(e.value), (needle, str(e.value))


def test_a_missing_prompt_or_answer_column_is_refused_before_ray_starts(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": "a"}) + "\n" for i in range(8)))
    job = validate_job(grpo_job("g", data={"source": str(rows)}))
    with pytest.raises(DataError, match="data.columns.prompt"):
        train(job, address="127.0.0.1:1")  # nothing listens there: the error must come first
    rows.write_text("".join(json.dumps({"prompt": f"q{i}", "label": "a"}) + "\n" for i in range(8)))
    job = validate_job(grpo_job("g", data={"source": str(rows)}, grpo={"rewards": [{"type": "exact_match"}]}))
    with pytest.raises(DataError, match="no column 'answer'"):
        train(job, address="127.0.0.1:1")


# --------------------------------------------------------------------------- rewards, advantages, loss, data


def test_builtin_rewards_and_a_failing_function_mark_samples_not_the_run():
    from hone.training.rewards import call_reward_function, score

    raw = grpo_job("g", grpo={"rewards": [
        {"type": "exact_match"},
        {"type": "choice", "labels": ["negative", "positive"], "column": "answer", "partial": 0.25},
        {"type": "regex", "pattern": r"answer: (\w+)", "column": "answer"},
        {"type": "json_schema", "json_schema": {"type": "object", "required": ["label"]}},
    ]})
    job = validate_job(raw)
    rows = [{"answer": "Positive"}] * 4
    table = score(job, ["p"] * 4, [" positive.", "negative", "the answer: positive", '{"label": 1}'], rows)
    assert table[0][:2] == [1.0, 1.0] and table[1][:2] == [0.0, 0.25]
    assert table[2][2] == 1.0 and table[0][2] == 0.0
    assert [row[3] for row in table] == [0.0, 0.0, 0.0, 1.0]
    # a user function that raises marks only the samples it fails on; non-numbers are marked too
    values = call_reward_function("tests.training.grpo_rewards:fragile", ["p"] * 3, ["ab", "boom", "abcd"], [{}] * 3)
    assert values[0] == 2.0 and math.isnan(values[1]) and values[2] == 4.0
    values = call_reward_function("tests.training.grpo_rewards:not_numbers", ["p"] * 2, ["a", "b"], [{}] * 2)
    assert values[0] == 0.5 and math.isnan(values[1])


def test_group_advantages_and_the_clipped_loss():
    from hone.training.grpo import advantages, grpo_loss

    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv = advantages(rewards, 4, scale=True)
    assert adv[:4].sum().abs() < 1e-9 and adv[0] > 0 and torch.all(adv[4:] == 0)  # a tied group teaches nothing
    assert adv[0] == pytest.approx(0.75 / (0.5 + 1e-4))
    assert advantages(rewards, 4, scale=False)[0] == pytest.approx(0.75)

    job = validate_job(grpo_job("g", grpo={"epsilon": 0.2}))
    logps = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.5]])).requires_grad_(True)
    mask = torch.ones(2, 2, dtype=torch.bool)
    a = torch.tensor([1.0, -1.0])
    # on-policy (old = current): the loss is −mean(A) and its gradient the policy gradient −A/T per token
    loss, parts = grpo_loss(job, logps, logps.detach(), a, mask, None)
    loss.backward()
    assert float(loss) == pytest.approx(0.0)
    assert torch.allclose(logps.grad, torch.tensor([[-0.25, -0.25], [0.25, 0.25]]))
    # a ratio past 1 + ε with a positive advantage is clipped: no gradient, counted
    logps2 = torch.log(torch.tensor([[0.9, 0.9]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.5, 0.5]]))
    loss, parts = grpo_loss(job, logps2, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=torch.bool), None)
    loss.backward()
    assert float(loss) == pytest.approx(-1.2) and torch.all(logps2.grad == 0) and float(parts["clipped"]) == 2


def test_prompt_rows_keep_the_prompt_the_answer_and_the_row():
    job = validate_job(grpo_job("g", data={"prompt_template": "chat", "max_samples": 16}))
    tokenizer = load_tokenizer(job)
    rows = list(prepare_data(job, tokenizer).train)
    for r in rows[:4]:
        prompt = r["input_ids"][: r["prompt_len"]]
        text = tokenizer.decode(prompt)
        assert text.endswith("<|im_start|>assistant\n") and json.loads(r["row"])["prompt"][-40:] in text
        assert all(x == -100 for x in r["labels"][: r["prompt_len"]])
        answer = tokenizer.decode([t for t in r["labels"] if t != -100])
        assert answer.strip().startswith(json.loads(r["row"])["answer"])


def test_a_grpo_job_is_judged_by_its_held_out_reward_by_default():
    raw = grpo_job("g")
    del raw["training"]["eval_metric"]
    raw["tune"] = {"search_space": {"training.lr": {"loguniform": [1e-4, 1e-2]}}}
    job = validate_job(raw)
    assert job.training.eval_metric == "eval_reward" and job.tune.metric == "eval_reward"
