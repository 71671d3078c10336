"""hone train on a real three-node Ray cluster with real DeepSpeed engines (CPU, gloo).

Exports are reloaded with plain transformers/peft outside Ray and must reproduce the eval loss computed during training.
One run is hit by three faults in turn (a worker SIGKILLed, then the driver, then its newest checkpoint damaged): each
restart and resume must reproduce, for every step it computes again, the loss logged before the fault.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from hone.config import JobConfigError, validate_job
from hone.data import load_tokenizer, prepare_data
from hone.modeling import ModelError, build_model, evaluate, load_base_model
from hone.training import Schedule, TrainError, schedule, total_steps, train

from tests.helpers import (
    check_full_weights,
    hone,
    kill_run,
    logged_step,
    losses,
    only_run,
    read_metrics,
    reload_eval,
    run_dirs,
    start_hone,
    train_worker_pids,
    wait_until,
)

# The data of jobs/tiny-smoke.yaml and jobs/sweep-tiny.yaml: tokenised once for the whole session (HONE_DATA_CACHE).
TINY = {
    "model": {"name": "builtin:tiny-llama"},
    "data": {"source": "builtin:rotten-tomatoes", "format": "alpaca", "prompt_template": "chat", "max_length": 128,
             "max_samples": 256, "max_eval_samples": 32},
    "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
    "distributed": {"num_workers": 2, "deepspeed": {"stage": 2}},
    "training": {"lr": 2e-3, "max_steps": 4, "batch_size": 4, "log_every": 2},
}


def tiny(name: str, **sections) -> dict:
    raw = json.loads(json.dumps(TINY))
    raw["name"] = name
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and key != "method":
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def check_export(result, job, stage: int) -> None:
    """What every export must be: its metadata, its metrics history and TensorBoard events, and plain transformers/peft
    reproducing the eval loss training computed."""
    assert result.export_dir is not None and result.metrics["done"]
    trained_loss = result.metrics["eval_loss"]
    reloaded = reload_eval(result.export_dir, job)
    assert abs(reloaded["eval_loss"] - trained_loss) < 1e-4, (reloaded, trained_loss)
    info = json.loads((result.export_dir / "hone.json").read_text())
    assert info["zero_stage"] == stage and info["metrics"]["eval_loss"] == pytest.approx(trained_loss)
    history = read_metrics(result.run_dir)
    assert [m["step"] for m in history] == [2, 4]
    assert all(k in history[0] for k in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "step_time_s", "peak_memory_mb"))
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))


def check_adapter(export: Path) -> None:
    from safetensors.torch import load_file

    adapter = load_file(export / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 4 * 1 and all(v.abs().sum() > 0 for v in lora_b)  # 2 layers × q/k/v/o, trained
    assert (export / "adapter_model.safetensors").stat().st_size > 10_000


# --------------------------------------------------------------------------- exports


@pytest.mark.slow
@pytest.mark.parametrize("stage, method", [(0, "full"), (0, "lora"), (3, "full"), (3, "lora")],
                         ids=["full-0", "lora-0", "full-3", "lora-3-two-nodes"])
def test_export_reloads_and_reproduces_eval_loss(connected, stage, method):
    """Full fine-tuning under ZeRO-2 is the comparison's classifier run (tests/comparison/test_compare.py), LoRA under
    ZeRO-2 the fault test's run. The ZeRO-3 LoRA
    run places its two workers on two different nodes (STRICT_SPREAD)."""
    sections = {"distributed": {"num_workers": 2, "deepspeed": {"stage": stage}}}
    if method == "full":
        sections["method"] = "full"
        sections["training"] = {**TINY["training"], "lr": 1e-3}
    if stage == 3 and method == "lora":
        sections["distributed"]["placement_strategy"] = "STRICT_SPREAD"
    job = validate_job(tiny(f"export-z{stage}-{method}", **sections))
    result = train(job, storage_path=str(connected), quiet=True)
    check_export(result, job, stage)
    base = load_base_model(job)
    if method == "lora":
        check_adapter(result.export_dir)
    else:
        check_full_weights(result.export_dir, base)
    if stage == 3 and method == "lora":
        workers = json.loads((result.export_dir / "hone.json").read_text())["workers"]
        assert len({w["node_id"] for w in workers}) == 2, workers


@pytest.mark.slow
def test_ddp_and_merged_adapter(connected):
    job = validate_job(tiny("ddp-merged", distributed={"num_workers": 2, "deepspeed": None},
                            method={**TINY["method"], "merge_adapter": True}))
    result = train(job, storage_path=str(connected), quiet=True)
    assert result.merged_dir is not None
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tokenizer = load_tokenizer(job)
    prepared = prepare_data(job, tokenizer)
    merged_eval = evaluate(merged, list(prepared.validation), job, tokenizer.pad_token_id)
    assert abs(merged_eval["eval_loss"] - result.metrics["eval_loss"]) < 1e-4
    assert abs(reload_eval(result.export_dir, job)["eval_loss"] - result.metrics["eval_loss"]) < 1e-4


# --------------------------------------------------------------------------- restart, resume and fault tolerance


@pytest.mark.slow
def test_a_worker_kill_restarts_and_a_driver_kill_resumes_past_a_damaged_checkpoint(cluster, tmp_path, slow_reports):
    """One 10-step run (every step logged, checkpoints at 4 and 8, reports waiting for the controller's 1 s poll, so a
    kill after a logged step lands long before the next checkpoint):

    1. a Ray Train worker is SIGKILLed after step 5: Ray Train restarts the group from the step-4 checkpoint, which
       computes step 5 again with the loss logged before;
    2. the driver (``hone train``) is SIGKILLed after step 9, and a file of the newest checkpoint (step 8) is damaged;
    3. ``hone train --resume`` notices (each rank checks its manifest), warns, resumes from the step-4 checkpoint, and
       every step it computes again reproduces the loss logged for it before; the run finishes and exports (LoRA under
       ZeRO-2: plain peft reproduces the eval loss training computed).
    """
    raw = tiny("resume", training={**TINY["training"], "max_steps": 10, "log_every": 1, "checkpoint_every": 4},
               distributed={**TINY["distributed"], "max_failures": 2})
    job = tmp_path / "resume.yaml"
    job.write_text(yaml.safe_dump(raw))
    storage, log = tmp_path / "runs", tmp_path / "train.log"
    proc = start_hone("train", str(job), "--address", cluster["address"], "--storage-path", str(storage), env=slow_reports, log=log)
    workers: list[int] = []
    try:
        run_dir = wait_until(lambda: next(iter(run_dirs(storage)), None), "the run directory", proc=proc, log=log)
        wait_until(lambda: logged_step(run_dir, 5), "step 5", proc=proc, log=log)
        workers = train_worker_pids(cluster["address"])
        assert workers, "no Ray Train worker found"
        os.kill(workers[-1], signal.SIGKILL)
        wait_until(lambda: len(losses(run_dir).get(5, [])) == 2, "step 5 computed again after the restart", proc=proc, log=log)
        workers = wait_until(lambda: train_worker_pids(cluster["address"]), "the restarted workers", proc=proc, log=log)
        wait_until(lambda: logged_step(run_dir, 9), "step 9", proc=proc, log=log)
    finally:
        kill_run(proc, workers)
    before = losses(run_dir)
    assert max(before) < 10, "the run finished before its driver could be killed"
    restarted = [s for s, values in before.items() if len(values) > 1]
    assert 5 in restarted and max(restarted) < 8, before  # recomputed from the step-4 checkpoint
    for step in restarted:
        assert max(before[step]) - min(before[step]) < 1e-5, (step, before[step])

    snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    latest = run_dir / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 8
    older = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and p.name < latest.name)
    assert older and json.loads((older[-1] / "trainer_state.json").read_text())["step"] == 4
    damaged = latest / "rng_rank1.pt"
    damaged.write_bytes(damaged.read_bytes()[:-16])  # a truncated write
    out = hone("train", "--resume", str(run_dir), "--address", cluster["address"], env=slow_reports)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "rng_rank1.pt does not match its checksum" in text and "falling back to the previous checkpoint" in text, text[-4000:]
    assert "resumed at step 4/10" in text
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 11))
    for step in range(5, 10):  # every step after the older checkpoint was computed again: the same losses
        assert len(after[step]) > len(before[step]) and max(after[step]) - min(after[step]) < 1e-5, (step, after[step])
    info = json.loads((run_dir / "export" / "hone.json").read_text())
    assert info["zero_stage"] == 2 and info["kind"] == "adapter"
    assert abs(reload_eval(run_dir / "export", validate_job(raw))["eval_loss"] - info["metrics"]["eval_loss"]) < 1e-4
    check_adapter(run_dir / "export")


def test_resume_refuses_changed_data(tmp_path):
    """The data file edited in place (same size, same timestamps) since the run started: resuming is refused before any
    Ray work, naming what changed."""
    from hone.artifacts import INPUTS_FILE, JOB_FILE
    from hone.data import dataset_fingerprint, tokenizer_digest

    data = tmp_path / "reviews.jsonl"
    rows = [{"instruction": "Label it.", "input": f"review {i}", "output": "positive"} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = validate_job(tiny("changed", data={**TINY["data"], "source": str(data), "max_samples": None}))
    run_dir = tmp_path / "changed-run"
    run_dir.mkdir()
    (run_dir / JOB_FILE).write_text(job.to_yaml())
    (run_dir / INPUTS_FILE).write_text(json.dumps({"data": dataset_fingerprint(job), "tokenizer": tokenizer_digest(load_tokenizer(job))}))
    stat = data.stat()
    data.write_text(data.read_text().replace("positive", "negative", 1).replace("review 1", "review 9", 1))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert data.stat().st_size == stat.st_size
    with pytest.raises(TrainError, match="cannot resume changed-run: its data changed since the run started"):
        train(resume=str(run_dir), address="127.0.0.1:1")  # refused before connecting anywhere


# --------------------------------------------------------------------------- non-finite losses


@pytest.mark.slow
def test_a_diverging_run_stops_at_the_step_and_exports_nothing(cluster, cluster_env, tmp_path, repo):
    """The issue's repro: ``hone train jobs/tiny-smoke.yaml training.lr=1e30`` used to exit 0 with ``loss nan`` and an export."""
    out = hone("train", str(repo / "jobs" / "tiny-smoke.yaml"), "training.lr=1e30", "--address", cluster["address"],
               "--storage-path", str(tmp_path), env=cluster_env)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "diverged at step" in text and "non-finite" in text and "nothing was exported or registered" in text, text[-3000:]
    assert "the last good checkpoint is" in text or "no checkpoint was written" in text, text[-3000:]
    run_dir = only_run(tmp_path)
    history = read_metrics(run_dir)
    stopped = history[-1]
    assert stopped["diverged"] and stopped["step"] < 8, history  # at the step it happened, not at the end
    assert all(math.isfinite(m["loss"]) for m in history[:-1]), history
    assert not (run_dir / "export").exists() and not (run_dir / "hone-run.json").exists()


@pytest.mark.slow
def test_skip_step_discards_updates_up_to_its_bound(connected):
    job = validate_job(tiny("skip", distributed={"num_workers": 2, "deepspeed": None},
                            training={**TINY["training"], "lr": 1e30, "max_steps": 8, "log_every": 1,
                                      "on_nonfinite": "skip_step", "max_skipped_steps": 2}))
    with pytest.raises(TrainError, match=r"diverged at step .*skipped step\(s\), more in a row than training.max_skipped_steps") as e:
        train(job, storage_path=str(connected), quiet=True)
    run_dir = next(p for p in run_dirs(Path(connected)) if p.name.startswith("skip"))
    history = read_metrics(run_dir)
    assert history[-1]["diverged"] and history[-1]["skipped_steps"] == 2, history
    assert any(m.get("skipped_steps") for m in history[:-1]), history  # the run went on after a skipped step
    assert not (run_dir / "export").exists(), e.value


_ENGINES = f"""
import math, os, pytest, torch
from hone.config import validate_job
from hone.modeling import build_model
from hone.training.backends import make_backend, optimizer_spec
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + os.environ["RENDEZVOUS_FILE"], rank=0, world_size=1)  # no port to race for
raw = validate_job({json.dumps(tiny("engine", training={**TINY["training"], "on_nonfinite": "skip_step"}))})
for deepspeed in (False, True):  # DDP, then ZeRO-2 (this one process as the only worker)
    job = raw.model_copy(update={{"distributed": raw.distributed.model_copy(update={{"num_workers": 1}})}})
    if not deepspeed:
        job = job.model_copy(update={{"distributed": job.distributed.model_copy(update={{"deepspeed": None}})}})
    torch.manual_seed(0)
    engine = make_backend(job, build_model(job, total_steps=4), 1, 4)
    params = lambda: [p.detach().clone() for p in engine.hf_module.parameters() if p.requires_grad]
    batch = torch.randint(0, 100, (2, 8))
    def loss_of(scale):
        return engine.module(input_ids=batch, labels=batch).loss * scale
    before = params()
    engine.train_micro(loss_of(float("nan")))
    assert not engine.step_applied and not math.isfinite(engine.grad_norm), (deepspeed, engine.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, params())), f"a non-finite step changed the weights ({{deepspeed=}})"
    engine.train_micro(loss_of(1.0))
    assert engine.step_applied and math.isfinite(engine.grad_norm), deepspeed
    assert any(not torch.equal(a, b) for a, b in zip(before, params())), f"the next healthy step was not applied ({{deepspeed=}})"
    # a step with nothing to learn (GRPO: every group tied): no update on momentum alone, and the schedule advances
    learned, epoch = params(), engine.scheduler.last_epoch
    engine.skip_update()
    assert all(torch.equal(a, b) for a, b in zip(learned, params())), f"a skipped update changed the weights ({{deepspeed=}})"
    assert engine.grad_norm == 0.0 and engine.scheduler.last_epoch == epoch + 1, (deepspeed, engine.grad_norm)
    engine.train_micro(loss_of(0.0))  # the same zero gradient through the optimizer: its momentum moves the weights
    assert any(not torch.equal(a, b) for a, b in zip(learned, params())), f"momentum alone moved nothing ({{deepspeed=}})"
    # one optimizer declaration for both backends, and population-based training's fields applied to either
    spec = optimizer_spec(job)
    if deepspeed:
        assert {{k: v for k, v in engine.config["optimizer"]["params"].items() if k != "torch_adam"}} == spec["params"]
    else:
        assert type(engine.optimizer).__name__ == spec["type"]
    new = job.model_copy(update={{"training": job.training.model_copy(update={{"lr": job.training.lr * 2, "weight_decay": 0.05}})}})
    engine.retarget(new)
    groups = engine.scheduler.optimizer.param_groups
    assert all(g["initial_lr"] == new.training.lr and g["weight_decay"] == 0.05 for g in groups), (deepspeed, groups)
    assert engine.lr == pytest.approx(groups[0]["lr"]) and engine.scheduler.base_lrs[0] == new.training.lr
    print("ok", deepspeed)
"""


@pytest.mark.slow
def test_backends_discard_a_non_finite_step_apply_the_next_and_take_new_hyperparameters(tmp_path):
    """DDP and ZeRO-2, one after the other in one process: a non-finite step is discarded, the next applied; a step with
    nothing to learn leaves the weights bit-identical (a zero gradient through AdamW would not); both optimizers come
    from one declaration and take population-based training's new values (``retarget``)."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "RENDEZVOUS_FILE": str(tmp_path / "rendezvous"),
           "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", _ENGINES], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok False" in out.stdout and "ok True" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]


_RESIZE = """
import json, os, sys, torch
import torch.distributed as dist
mode, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
# a rendezvous file, not a port: a port picked free by the test could be taken by another process before rank 0 binds it
dist.init_process_group("gloo", init_method="file://" + sys.argv[6], rank=rank, world_size=world)
from hone.config import validate_job
from hone.modeling import build_model
from hone.training.backends import make_backend, universal_checkpoint
g = torch.Generator().manual_seed(1)
batches = [torch.randint(0, 100, (4, 12), generator=g) for _ in range(6)]
for raw in json.loads(sys.argv[5]):  # ZeRO-2, then ZeRO-3, in the same processes
    job = validate_job(raw)
    stage, ckpt = job.distributed.deepspeed.stage, os.path.join(out, f"zero{job.distributed.deepspeed.stage}")
    torch.manual_seed(0)
    engine = make_backend(job, build_model(job, total_steps=10), world, 10)
    def step(i):  # 4 rows a step: 2 micro-batches of 2, shared by the workers
        total = 0.0
        for m in range(2 // world):
            j = m * world + rank  # the micro-batch's global index: its rows and its dropout stream, on any worker
            x = batches[i][2 * j: 2 * j + 2]
            torch.manual_seed(1000 * i + j)
            loss = engine.module(input_ids=x, labels=x).loss
            engine.train_micro(loss)
            total += float(loss.detach()) / (2 // world)
        t = torch.tensor([total]); dist.all_reduce(t); return float(t) / world
    if mode == "save":
        for i in range(3): step(i)
        engine.save(ckpt)
        after = [step(i) for i in range(3, 6)]
    else:
        if rank == 0: universal_checkpoint(ckpt)
        dist.barrier()
        engine.load(ckpt, resized=True)
        after = [step(i) for i in range(3, 6)]
    if rank == 0: print("LOSSES", stage, json.dumps(after))
    del engine
"""


@pytest.mark.slow
def test_a_zero_checkpoint_reloads_on_another_number_of_workers(tmp_path):
    """Elastic ZeRO (stages 2 and 3, one after the other in the same processes): a LoRA checkpoint two workers wrote
    continues on one worker (DeepSpeed's universal checkpoint) with the losses the two workers go on to compute."""
    jobs = [tiny("resize", distributed={"num_workers": [1, 2], "deepspeed": {"stage": stage}, "max_failures": 1},
                 training={**TINY["training"], "grad_accum": 1}) for stage in (2, 3)]

    def run(mode: str, world: int) -> dict[str, list[float]]:
        env = {**os.environ, "DS_ACCELERATOR": "cpu"}
        rendezvous = tmp_path / f"rendezvous-{mode}"
        logs = [tmp_path / f"{mode}-rank{r}.log" for r in range(world)]
        procs = [subprocess.Popen([sys.executable, "-c", _RESIZE, mode, str(r), str(world), str(tmp_path / "ckpt"), json.dumps(jobs),
                                   str(rendezvous)], env=env, stdout=open(logs[r], "w"), stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        # a rank that fails ends the others at once (they would wait for it in a collective until the bound)
        try:
            wait_until(lambda: all(p.poll() is not None for p in procs) or any(p.poll() not in (None, 0) for p in procs),
                       f"the {mode} ranks to finish", timeout=300)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
        assert all(p.returncode == 0 for p in procs), "\n".join(log.read_text()[-3000:] for log in logs)
        lines = [line.split(" ", 2) for line in logs[0].read_text().splitlines() if line.startswith("LOSSES")]
        return {stage: json.loads(values) for _, stage, values in lines}

    two = run("save", 2)
    one = run("load", 1)
    assert sorted(two) == sorted(one) == ["2", "3"], (two, one)
    for stage in ("2", "3"):
        assert (tmp_path / "ckpt" / f"zero{stage}" / "state_universal" / ".complete").exists()
        for a, b in zip(one[stage], two[stage]):
            assert abs(a - b) < 1e-4 * abs(b), (stage, one[stage], two[stage])


def test_skip_step_refuses_zero_stage_0():
    from hone.config import JobConfigError

    with pytest.raises(JobConfigError, match="training.on_nonfinite.*ZeRO stage 0 applies it"):
        validate_job(tiny("z0", distributed={"num_workers": 2, "deepspeed": {"stage": 0}},
                          training={**TINY["training"], "on_nonfinite": "skip_step"}))


# --------------------------------------------------------------------------- fast checks (no Ray)


def test_schedule_depends_only_on_seed_and_epoch():
    s = Schedule(n_rows=50, micro_batch=3, micro_batches=4, world_size=2, seed=7)
    assert s.global_batch == 12 and s.steps_per_epoch == 4
    epoch0 = [i for step in range(4) for m in range(2) for r in range(2) for i in s.micro_rows(step, m, r)]
    assert len(epoch0) == len(set(epoch0)) == 48  # no row twice in an epoch
    assert s.micro_rows(5, 1, 0) == Schedule(50, 3, 4, 2, 7).micro_rows(5, 1, 0)
    assert s.micro_rows(1, 0, 0) != s.micro_rows(5, 0, 0)  # a new permutation each epoch
    assert set(s.micro_rows(0, 0, 0)).isdisjoint(s.micro_rows(0, 0, 1))


def test_schedule_keeps_the_global_batch_whatever_the_worker_count():
    """An elastic run (num_workers [1, 4], grad_accum 3): 12 micro-batches per step however many workers share them;
    each micro-batch has the same rows and the same random stream on whichever worker computes it."""
    job = validate_job(tiny("elastic", training={**TINY["training"], "grad_accum": 3},
                            distributed={"num_workers": [1, 4], "deepspeed": None, "max_failures": 3}))
    by_world = {}
    for world in (1, 2, 3, 4):
        s = schedule(job, 400, world)
        assert s.grad_accum * world == 12 and s.global_batch == 12 * job.training.batch_size
        by_world[world] = {s.micro_index(m, r): (s.micro_rows(3, m, r), s.micro_seed(3, m, r))
                           for r in range(world) for m in range(s.grad_accum)}
    assert by_world[1] == by_world[2] == by_world[3] == by_world[4] and sorted(by_world[1]) == list(range(12))


def test_elastic_settings_that_cannot_keep_the_global_batch_are_refused():
    with pytest.raises(JobConfigError, match=r"(?s)grad_accum.*cannot be shared evenly by 2 worker.*set training.grad_accum: 2"):
        validate_job(tiny("e", distributed={"num_workers": [2, 3], "deepspeed": None, "max_failures": 1}))
    with pytest.raises(JobConfigError, match="max_failures >= 1"):
        validate_job(tiny("e", distributed={"num_workers": [1, 2], "deepspeed": None}))
    with pytest.raises(JobConfigError, match=r"1 <= min <= max"):
        validate_job(tiny("e", distributed={"num_workers": [3, 2], "deepspeed": None, "max_failures": 1}))
    ok = validate_job(tiny("e", training={**TINY["training"], "grad_accum": 2},
                           distributed={"num_workers": [2, 3], "deepspeed": {"stage": 0}, "max_failures": -1}))
    assert ok.distributed.elastic and ok.distributed.max_workers == 3


def test_too_little_data_is_caught_before_ray():
    job = validate_job(tiny("small", training={**TINY["training"], "batch_size": 64}))
    with pytest.raises(TrainError, match="fewer than one global batch"):
        total_steps(job, 100)


def test_unknown_target_modules_list_the_real_ones():
    job = validate_job(tiny("t", method={"type": "lora", "lora": {"target_modules": ["q_proj", "query"]}}))
    with pytest.raises(ModelError, match=r"\['query'\] match no module of LlamaForCausalLM.*'q_proj'"):
        build_model(job)


@pytest.mark.parametrize("method", ["adalora", "prefix_tuning", "ia3"])
def test_other_peft_methods_build(method):
    sections = {"method": {"type": method}}
    if method == "adalora":
        sections["distributed"] = {"num_workers": 1, "deepspeed": None}
    if method == "ia3":
        sections["method"] = {
            "type": "ia3",
            "ia3": {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]},
        }
    model = build_model(validate_job(tiny("m", **sections)), total_steps=10)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters())


def test_deepspeed_config_generation():
    from hone.training.backends import deepspeed_config

    job = validate_job(
        tiny(
            "d",
            distributed={
                "num_workers": 2,
                "deepspeed": {
                    "stage": 3,
                    "offload_optimizer": "cpu",
                    "offload_param": "cpu",
                    "extra": {"zero_optimization": {"sub_group_size": 1000}},
                },
            },
            training={**TINY["training"], "grad_accum": 4, "max_grad_norm": 0.5},
        )
    )
    cfg = deepspeed_config(job, world_size=2)
    assert cfg["train_batch_size"] == 4 * 4 * 2 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["gradient_clipping"] == 0.5
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] and z["sub_group_size"] == 1000
    assert cfg["optimizer"]["params"]["torch_adam"] and not cfg["bf16"]["enabled"]
    gpu = deepspeed_config(validate_job(tiny("g", distributed={"use_gpu": True})), 8)
    assert gpu["bf16"]["enabled"] and "torch_adam" not in gpu["optimizer"]["params"]


@pytest.mark.slow
def test_cli_train_on_local_embedded_ray(tmp_path, repo):
    """`hone train jobs/tiny-smoke.yaml` as a user runs it: its own Ray, started and shut down; then `hone eval`."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = hone("train", str(repo / "jobs" / "tiny-smoke.yaml"), "--storage-path", str(tmp_path), env=env, check=True)
    assert "[hone] step 8/8" in out.stdout and "export: " in out.stdout
    run_dir = only_run(tmp_path)
    assert (run_dir / "export" / "adapter_model.safetensors").exists()
    ev = hone("eval", str(run_dir), "-n", "16", env=env, timeout=300)
    assert ev.returncode == 0 and "on 16 test rows: eval_loss" in ev.stdout, ev.stdout + ev.stderr


def test_resume_of_unknown_run_is_clear(tmp_path):
    out = hone("train", "--resume", "no-such-run", "--storage-path", str(tmp_path), timeout=120)
    assert out.returncode == 1 and "no hone run at 'no-such-run'" in out.stderr


def test_a_failed_checkpoint_save_leaves_nothing_behind_and_damage_is_detected(tmp_path, monkeypatch):
    from hone.training.checkpoints import candidates, intact, write_checkpoint

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def disk_full(folder: Path) -> None:
        (folder / "state.pt").write_bytes(b"x" * 1000)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_checkpoint(0, disk_full)
    assert not list(tmp_path.glob("hone-ckpt-*")), "the failed save left its temporary directory"

    def fine(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "sub" / "state.pt").write_bytes(b"weights")
        (folder / "trainer_state.json").write_text("{}")

    saved = Path(write_checkpoint(1, fine))
    assert intact(saved, 1) == (True, "")
    assert intact(saved, 0)[0] is False  # rank 0 wrote no part of it: its manifest is missing
    (saved / "sub" / "state.pt").write_bytes(b"weightz")
    assert intact(saved, 1) == (False, "sub/state.pt does not match its checksum")
    run = tmp_path / "run"
    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02", "checkpoint_2026-01-01_00-00-03"):
        (run / name).mkdir(parents=True)
    assert candidates(str(run / "checkpoint_2026-01-01_00-00-02"), run) == [str(run / "checkpoint_2026-01-01_00-00-02"),
                                                                             str(run / "checkpoint_2026-01-01_00-00-01")]


def test_runs_started_in_the_same_second_never_share_a_directory(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from hone.artifacts import new_run_dir

    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: new_run_dir(tmp_path, "same"), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() for d in dirs)


def test_random_state_round_trips_as_data_and_a_pickle_in_its_place_is_refused(tmp_path):
    """A checkpoint's RNG file holds tensors and plain containers: it restores every generator exactly, and a file a
    writer of the shared volume swapped for a pickle that runs code is refused, not executed."""
    import random

    import numpy as np

    from hone.training.plan import TrainError, load_rng_state, save_rng_state, seed_all

    seed_all(3)
    random.random(), np.random.normal(), torch.rand(1)  # a cached gaussian in NumPy's state, too
    save_rng_state(tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.normal()), float(torch.rand(1)))
    seed_all(99)
    load_rng_state(tmp_path / "rng.pt")
    assert (random.random(), float(np.random.normal()), float(torch.rand(1))) == expected

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"python": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(TrainError, match="it is not unpickled"):
        load_rng_state(tmp_path / "evil.pt")
    assert not marker.exists()


def test_no_checkpoint_is_unpickled():
    library = Path(__file__).resolve().parents[2] / "platform"
    loads = [f"{p}:{i}" for p in library.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if "weights_only=False" in line]
    assert not loads, f"torch.load with weights_only=False runs whatever a checkpoint file holds: {loads}"
